//! Negotiate (Kerberos through SPNEGO, RFC 4559) to an upstream proxy: a fresh token for the
//! proxy's service principal (`HTTP/<proxy host>`), sent with the first request on each new
//! connection to it. Kerberos is the system's GSSAPI (MIT krb5, through `libgssapi`); the
//! agent's credentials come from its keytab (`kerberos_keytab`, for which the daemon sets
//! `KRB5_CLIENT_KTNAME` and an in-memory ticket cache, so tickets are got and renewed as needed)
//! or from a ticket cache someone else keeps fresh (`kerberos_ccache`). Delegation is never
//! asked for: the proxy gets no ticket of the agent's.

use std::time::Duration;

use base64::Engine;
use libgssapi::{
    context::{ClientCtx, CtxFlags},
    name::Name,
    oid::{GSS_MECH_SPNEGO, GSS_NT_HOSTBASED_SERVICE},
};

/// Points the system's Kerberos library at egress's credentials: its keytab (with a ticket cache
/// in memory, which the library fills and renews from the keytab) or a ticket cache kept by
/// someone else. Call before any thread starts: the environment is not thread-safe.
pub fn set_environment(settings: &crate::config::Settings) {
    let mut vars = Vec::new();
    if let Some(keytab) = &settings.kerberos_keytab {
        vars.push(("KRB5_CLIENT_KTNAME", format!("FILE:{}", keytab.display())));
        vars.push(("KRB5CCNAME", "MEMORY:egress".to_owned()));
    }
    if let Some(ccache) = &settings.kerberos_ccache {
        vars.push(("KRB5CCNAME", ccache.clone()));
    }
    for (name, value) in vars {
        // SAFETY: the callers (`egress run`, `egress check-config`) call this first, before
        // the runtime, the namespace helper or any other thread starts.
        unsafe { std::env::set_var(name, value) };
    }
}

/// The host names of the proxies egress authenticates to with Kerberos, each once.
pub fn negotiate_hosts(settings: &crate::config::Settings) -> Vec<String> {
    if !settings.kerberos() {
        return Vec::new();
    }
    let mut hosts: Vec<String> = settings
        .proxy_urls()
        .iter()
        .flat_map(|list| list.urls())
        .filter(|url| !url.has_credentials())
        .map(|url| url.host.clone())
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// How long getting a token may take (it may ask the KDC for tickets).
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no token could be made, in the system's words (no secret in them: principal names,
/// realms and the library's reasons).
#[derive(Debug, Clone, thiserror::Error)]
#[error("Kerberos ticket for HTTP/{host}: {reason}")]
pub struct NegotiateError {
    pub host: String,
    pub reason: String,
    /// The proxy refused the token (407): another proxy of the list may take it. Otherwise the
    /// token could not be made (the KDC, the keytab): no other proxy would fare better.
    pub refused_by_proxy: bool,
}

/// Token requests at once: each may wait on the KDC on a blocking thread, which must not fill
/// the runtime's blocking pool (proxy name lookups and direct connects use it too).
const MAX_TOKENS_AT_ONCE: usize = 4;

static TOKEN_PERMITS: std::sync::LazyLock<std::sync::Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_TOKENS_AT_ONCE)));

/// A `Negotiate <base64>` header value for the proxy at `host` (its name, as in its service
/// principal: an address cannot name one). Blocking: call from a blocking thread.
pub fn token_blocking(host: &str) -> Result<String, NegotiateError> {
    let error = |e: &dyn std::fmt::Display| NegotiateError {
        host: host.to_owned(),
        reason: hint(&e.to_string()),
        refused_by_proxy: false,
    };
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Err(NegotiateError {
            host: host.to_owned(),
            reason: "the proxy is named by an address; Kerberos needs its host name (the one in \
                     its HTTP/ service principal)"
                .into(),
            refused_by_proxy: false,
        });
    }
    let target = Name::new(format!("HTTP@{host}").as_bytes(), Some(GSS_NT_HOSTBASED_SERVICE))
        .map_err(|e| error(&e))?;
    // No credential given: the default one, resolved anew for each context, which is what lets
    // MIT get a fresh ticket from the client keytab when the cached one expires.
    let mut context = ClientCtx::new(None, target, CtxFlags::empty(), Some(GSS_MECH_SPNEGO));
    let token = context.step(None, None).map_err(|e| error(&e))?;
    let token = token.ok_or_else(|| NegotiateError {
        host: host.to_owned(),
        reason: "the security context completed without a token".into(),
        refused_by_proxy: false,
    })?;
    Ok(format!(
        "Negotiate {}",
        base64::engine::general_purpose::STANDARD.encode(&*token)
    ))
}

/// A token without blocking the event loop, within [`TOKEN_TIMEOUT`] (waiting for a turn
/// included: at most [`MAX_TOKENS_AT_ONCE`] are made at once, and a thread past its deadline
/// keeps its turn until the library gives up).
pub async fn token(host: &str) -> Result<String, NegotiateError> {
    let failed = |reason: String| NegotiateError {
        host: host.to_owned(),
        reason,
        refused_by_proxy: false,
    };
    let owned = host.to_owned();
    let made = async move {
        let permit = TOKEN_PERMITS
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            token_blocking(&owned)
        })
        .await
        .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(TOKEN_TIMEOUT, made).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(failed(format!("the token thread failed: {e}"))),
        Err(_) => Err(failed(format!(
            "no token within {}s (the KDC does not answer, or too many requests wait for it)",
            TOKEN_TIMEOUT.as_secs()
        ))),
    }
}

/// Whether the KDC does not know the proxy's service principal: that proxy takes no Kerberos
/// (a partner's, a route's), and is asked without credentials.
fn unknown_principal(error: &NegotiateError) -> bool {
    error.reason.contains("not found in Kerberos database")
}

/// How long a proxy whose principal the KDC does not know is asked without credentials before
/// the KDC is asked again.
const UNKNOWN_FOR: Duration = Duration::from_secs(60);

static UNKNOWN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>> =
    std::sync::LazyLock::new(Default::default);

/// A token for the proxy at `host`, or none when the realm has no principal for it (then the
/// proxy is asked without credentials, and says itself whether it wants some).
pub async fn token_if_known(host: &str) -> Result<Option<String>, NegotiateError> {
    let unknown = |now: std::time::Instant| {
        UNKNOWN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .is_some_and(|since| now.duration_since(*since) < UNKNOWN_FOR)
    };
    if unknown(std::time::Instant::now()) {
        return Ok(None);
    }
    match token(host).await {
        Ok(token) => Ok(Some(token)),
        Err(e) if unknown_principal(&e) => {
            tracing::info!("{e}: the proxy is asked without Kerberos");
            let mut known = UNKNOWN.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() > 256 {
                known.clear();
            }
            known.insert(host.to_owned(), std::time::Instant::now());
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The library's reason, with what an admin can do about the usual ones.
fn hint(reason: &str) -> String {
    let advice = [
        (
            "Clock skew too great",
            "the clocks of this host and the KDC (or the proxy) differ: run NTP",
        ),
        (
            "Ticket expired",
            "the ticket cache holds an expired ticket: renew it, or give egress a keytab",
        ),
        (
            "not found in Kerberos database",
            "the KDC has no such service principal: check the proxy's host name",
        ),
        (
            "Preauthentication failed",
            "the keytab's keys are not the principal's current ones: export it again",
        ),
        (
            "Decrypt integrity check failed",
            "the keytab's keys are not the principal's current ones: export it again",
        ),
        (
            "No Kerberos credentials available",
            "no keytab or ticket cache with a usable ticket: set kerberos_keytab",
        ),
        (
            "Can't find client principal",
            "the keytab has no key for the client principal",
        ),
        ("Cannot find KDC", "krb5.conf names no KDC for the realm"),
        ("Cannot contact any KDC", "the KDC does not answer"),
    ];
    match advice.iter().find(|(needle, _)| reason.contains(needle)) {
        Some((_, what)) => format!("{reason}; {what}"),
        None => reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_named_by_address_cannot_have_a_ticket() {
        let e = token_blocking("10.0.0.1").unwrap_err();
        assert!(e.reason.contains("host name"), "{e}");
    }

    #[test]
    fn usual_failures_say_what_to_do() {
        for (reason, advice) in [
            ("Miscellaneous failure (Clock skew too great)", "run NTP"),
            ("Ticket expired", "renew it"),
            (
                "Server HTTP/p@R not found in Kerberos database",
                "proxy's host name",
            ),
            ("something else", "something else"),
        ] {
            assert!(hint(reason).contains(advice), "{reason}: {}", hint(reason));
        }
    }
}
