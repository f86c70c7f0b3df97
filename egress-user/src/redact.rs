//! Keeping proxy passwords out of what egress prints. Proxy URLs are displayed redacted where
//! egress formats them itself; this is the net under everything else: parser messages that
//! quote the input (TOML, YAML, clap), whatever the input was. Every error egress prints and
//! every reload failure it logs passes through [`redact_credentials`].

/// `text` with the password of every `user:password@host` (with or without `scheme://`)
/// replaced by `***`. A quoted string (`"..."`, `'...'`, `` `...` ``) is one token, spaces and
/// all; elsewhere tokens run between whitespace. A token's last `@` ends the user information,
/// so a password containing `@`, `,`, `;` or brackets is masked whole.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c.is_whitespace() {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        } else if matches!(c, '"' | '\'' | '`') {
            // The quoted string, or the rest if it is not closed.
            out.push(c);
            rest = &rest[1..];
            let end = rest.find(c).unwrap_or(rest.len());
            out.push_str(&redact_token(&rest[..end]));
            out.push_str(&rest[end..(end + 1).min(rest.len())]);
            rest = &rest[(end + 1).min(rest.len())..];
        } else {
            let end = rest
                .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
                .unwrap_or(rest.len());
            out.push_str(&redact_token(&rest[..end]));
            rest = &rest[end..];
        }
    }
    out
}

fn redact_token(token: &str) -> String {
    let Some(at) = token.rfind('@') else {
        return token.to_owned();
    };
    let userinfo_start = token.find("://").map_or(0, |i| i + 3);
    if userinfo_start > at {
        return token.to_owned();
    }
    match token[userinfo_start..at].find(':') {
        Some(colon) => {
            let password_start = userinfo_start + colon + 1;
            format!("{}***{}", &token[..password_start], &token[at..])
        }
        None => token.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_whatever_surrounds_them() {
        let cases = [
            ("http://alice:S3cretPW@proxy:3128", "http://alice:***@proxy:3128"),
            ("alice:S3cretPW@proxy:3128", "alice:***@proxy:3128"),
            ("https://alice:p@ss:w@rd@proxy", "https://alice:***@proxy"),
            (
                "line 1: https_proxy = http://alice:S3cretPW@proxy:3128\n     ^",
                "line 1: https_proxy = http://alice:***@proxy:3128\n     ^",
            ),
            (
                "invalid type: string \"http://a:b@c\"",
                "invalid type: string \"http://a:***@c\"",
            ),
            ("(u:pw@h)", "(u:***@h)"),
            (
                "string \"http://alice:S3c;ret@proxy:3128\"",
                "string \"http://alice:***@proxy:3128\"",
            ),
            ("'http://alice:S3c,ret@proxy'", "'http://alice:***@proxy'"),
            ("\"http://alice:S3c ret@proxy\" x", "\"http://alice:***@proxy\" x"),
            (
                "unclosed \"http://alice:S3c ret@proxy",
                "unclosed \"http://alice:***@proxy",
            ),
            // Nothing to mask.
            ("http://alice@proxy:3128", "http://alice@proxy:3128"),
            ("mail root@example.org now", "mail root@example.org now"),
            ("[2001:db8::1]:3128", "[2001:db8::1]:3128"),
            ("", ""),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_credentials(input), expected, "{input:?}");
        }
    }
}
