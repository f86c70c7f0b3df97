//! Real third-party peers the tests talk to: a test CA (openssl), squid with basic auth, nginx
//! serving TLS, dnsmasq, and the origin's packet counter (nftables) that tells whether anything
//! went direct. Synapse is in [`synapse`], the container engine in [`docker`], a stand-in for the
//! Kubernetes API server in [`kubernetes`].

pub mod docker;
pub mod federation;
pub mod kerberos;
pub mod kubernetes;
pub mod resolvers;
pub mod synapse;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Result;

use crate::{
    process::{Daemon, Enter, launch, run},
    topology::netns::Netns,
};

/// A plain HTTP server on argv[1]:argv[2] (Python) that answers every GET with `client <the
/// client's address>`: where a connection came from, as the server saw it.
pub const ADDRESS_ECHO_SERVER: &str = r#"
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("client " + self.client_address[0]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"#;

/// A CA and one server certificate signed by it, made with the openssl CLI.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `days` may be negative: the certificate then expired that many days ago.
pub fn make_certs(dir: &Path, name: &str, dns_names: &[&str], ips: &[&str], days: i32) -> Result<Certs> {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    if !dir.join("ca.pem").exists() {
        let mut args = vec!["req", "-x509"];
        args.extend_from_slice(&ec);
        let (key, out) = (p("ca.key"), p("ca.pem"));
        args.extend_from_slice(&[
            "-keyout",
            &key,
            "-out",
            &out,
            "-days",
            "3",
            "-subj",
            "/CN=egress test CA",
        ]);
        run("openssl", &args)?;
    }
    let (key, csr, cert) = (
        p(&format!("{name}.key")),
        p(&format!("{name}.csr")),
        p(&format!("{name}.pem")),
    );
    let mut args = vec!["req"];
    args.extend_from_slice(&ec);
    let subject = format!("/CN={}", dns_names.first().copied().unwrap_or(name));
    args.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subject]);
    run("openssl", &args)?;
    let sans: Vec<String> = dns_names
        .iter()
        .map(|d| format!("DNS:{d}"))
        .chain(ips.iter().map(|i| format!("IP:{i}")))
        .collect();
    let ext = p(&format!("{name}.ext"));
    fs::write(&ext, format!("subjectAltName={}\n", sans.join(",")))?;
    let (ca, ca_key) = (p("ca.pem"), p("ca.key"));
    let days = days.to_string();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            &days,
            "-extfile",
            &ext,
        ],
    )?;
    Ok(Certs {
        ca: dir.join("ca.pem"),
        cert: PathBuf::from(cert),
        key: PathBuf::from(key),
    })
}

pub struct SquidOptions<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub http_port: u16,
    /// TLS ports (`https_port`) and the certificate each presents.
    pub https_ports: &'a [(u16, &'a Certs)],
    /// name -> address lines for squid's hosts_file (no DNS inside the namespaces).
    pub hosts: &'a str,
    /// A second plain port with squid's stock CONNECT rule: CONNECT only to port 443
    /// (`http_access deny CONNECT !SSL_ports`), as operators' squids usually have it.
    pub strict_port: Option<u16>,
    /// The address the plain port listens on (default: all of the namespace's).
    pub listen: Option<&'a str>,
    /// Kerberos only (`Negotiate`, no Basic): the proxy's service principal and its keytab.
    pub negotiate: Option<SquidNegotiate<'a>>,
    /// A clock this far off (`faketime`, e.g. `+2h`) for squid and its helpers.
    pub clock_offset: Option<&'a str>,
}

/// squid authenticating with Kerberos (`negotiate_kerberos_auth`).
pub struct SquidNegotiate<'a> {
    /// `HTTP/proxy.fqdn@REALM`.
    pub principal: &'a str,
    pub keytab: &'a Path,
    pub krb5_conf: &'a Path,
}

/// squid with basic auth (htpasswd + basic_ncsa_auth), CONNECT allowed to any port, access log
/// in `dir/squid/access.log`.
pub fn start_squid(ns: &Netns, dir: &Path, instance: &str, opts: &SquidOptions) -> Result<Daemon> {
    let sq = dir.join("squid");
    fs::create_dir_all(&sq)?;
    if let Some(negotiate) = &opts.negotiate {
        fs::copy(negotiate.keytab, sq.join("squid.keytab"))?;
    }
    let passwd = sq.join("passwd");
    run(
        "htpasswd",
        &["-bc", &passwd.to_string_lossy(), opts.user, opts.password],
    )?;
    let hosts = sq.join("hosts");
    fs::write(&hosts, opts.hosts)?;
    run("chown", &["-R", "proxy:proxy", &sq.to_string_lossy()])?;
    let d = sq.display();
    let https_ports: String = opts
        .https_ports
        .iter()
        .map(|(port, certs)| {
            format!(
                "https_port {port} tls-cert={} tls-key={}\n",
                certs.cert.display(),
                certs.key.display()
            )
        })
        .collect();
    let strict = opts
        .strict_port
        .map(|p| format!("http_port {p} name=strict\n"))
        .unwrap_or_default();
    let auth = match &opts.negotiate {
        Some(negotiate) => format!(
            "auth_param negotiate program /usr/lib/squid/negotiate_kerberos_auth -s {}\n\
             auth_param negotiate children 2 startup=1 idle=1\n\
             auth_param negotiate keep_alive on\n",
            negotiate.principal
        ),
        None => format!(
            "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
             auth_param basic children 2 startup=1 idle=1\n\
             auth_param basic realm egress-test\n",
            passwd.display()
        ),
    };
    let listen = opts.listen.map(|a| format!("{a}:")).unwrap_or_default();
    let conf = format!(
        "http_port {listen}{port}
{strict}{https_ports}
{auth}acl authed proxy_auth REQUIRED
acl strict_port myportname strict
acl SSL_ports port 443
acl CONNECT method CONNECT
http_access deny strict_port CONNECT !SSL_ports
http_access deny !authed
http_access allow authed
http_access deny all
access_log stdio:{d}/access.log squid
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
cache deny all
hosts_file {hosts}
dns_nameservers 127.0.0.1
shutdown_lifetime 1 second
max_filedescriptors 65536
",
        port = opts.http_port,
        hosts = hosts.display(),
    );
    let conf_path = sq.join("squid.conf");
    fs::write(&conf_path, conf)?;
    let conf_path = conf_path.to_string_lossy();
    let mut args = vec!["squid", "-N", "-n", instance, "-f", &conf_path];
    let offset;
    if let Some(clock) = opts.clock_offset {
        offset = clock.to_owned();
        args.splice(0..0, ["faketime", "-f", offset.as_str()]);
    }
    let mut command = launch(Some(&ns.name), Enter::NetAndEtc, None, args[0], &args[1..]);
    if let Some(negotiate) = &opts.negotiate {
        command
            .env(
                "KRB5_KTNAME",
                format!("FILE:{}", sq.join("squid.keytab").display()),
            )
            .env("KRB5_CONFIG", negotiate.krb5_conf);
    }
    Daemon::spawn("squid", command, &sq.join("stdout.log"))
}

/// `/.well-known/matrix/server` answers of the origin, by TLS server name: name -> m.server.
pub const MATRIX_DELEGATIONS: &[(&str, &str)] = &[("example.test", "fed.example.test")];

/// The origin's /preview.html: a page with Open Graph data, for URL previews.
/// Its Open Graph title is [`PREVIEW_TITLE`], which a preview of it must carry.
fn preview_page() -> String {
    format!(
        "<!doctype html><html><head><title>egress preview page</title>\
         <meta property=\"og:title\" content=\"{PREVIEW_TITLE}\"></head><body>hello</body></html>\n"
    )
}

/// The `og:title` of the origin's /preview.html.
pub const PREVIEW_TITLE: &str = "Reached through egress";

/// Size of the origin's /big.bin.
pub const BIG_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// nginx answering `origin ok PORT` over TLS on each of `tls_ports` and over plain HTTP on
/// `http_port`; the access log (`dir/nginx/access.log`) records the peer address of each request.
pub fn start_nginx(
    ns: &Netns,
    dir: &Path,
    certs: &Certs,
    tls_ports: &[u16],
    http_port: u16,
) -> Result<Daemon> {
    let ng = dir.join("nginx");
    fs::create_dir_all(&ng)?;
    let d = ng.display();
    let listens: String = tls_ports
        .iter()
        .map(|p| format!("    listen {p} ssl;\n    listen [::]:{p} ssl;\n"))
        .chain(std::iter::once(format!(
            "    listen {http_port};\n    listen [::]:{http_port};\n"
        )))
        .collect();
    let conf = format!(
        "daemon off;
user root;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 32768; }}
http {{
  log_format egress '$remote_addr $server_port \"$request\" $status $ssl_server_name';
  access_log {d}/access.log egress;
  client_body_temp_path {d}/tmp-body;
  proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fastcgi;
  uwsgi_temp_path {d}/tmp-uwsgi;
  scgi_temp_path {d}/tmp-scgi;
  # Matrix server discovery: which TLS names delegate, and where to (see MATRIX_DELEGATIONS).
  map $ssl_server_name $matrix_delegation {{
    default '';
{delegations}  }}
  server {{
{listens}    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{ return 200 \"origin ok $server_port\\n\"; }}
    location = /big.bin {{ root {d}/www; }}
    location = /preview.html {{ root {d}/www; }}
    location = /.well-known/matrix/server {{
      default_type application/json;
      if ($matrix_delegation = '') {{ return 404; }}
      return 200 $matrix_delegation;
    }}
    location = /_matrix/federation/v1/version {{
      default_type application/json;
      return 200 '{{\"server\": {{\"name\": \"egress-test-origin\", \"version\": \"$server_port\"}}}}';
    }}
  }}
}}
",
        cert = certs.cert.display(),
        key = certs.key.display(),
        delegations = MATRIX_DELEGATIONS
            .iter()
            .map(|(name, to)| format!("    {name} '{{\"m.server\": \"{to}\"}}';\n"))
            .collect::<String>(),
    );
    // A large file for transfers that must still be running when something fails.
    let www = ng.join("www");
    fs::create_dir_all(&www)?;
    fs::File::create(www.join("big.bin"))?.set_len(BIG_FILE_BYTES)?;
    fs::write(www.join("preview.html"), preview_page())?;
    let conf_path = ng.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let conf_path = conf_path.to_string_lossy();
    let command = launch(
        Some(&ns.name),
        Enter::NetAndEtc,
        None,
        "nginx",
        &["-c", &conf_path],
    );
    Daemon::spawn("nginx", command, &ng.join("stdout.log"))
}

/// Counts, with nftables rules in `ns`, every packet arriving from `source4` or `source6`.
pub fn install_packet_counter(ns: &Netns, source4: &str, source6: &str) -> Result<()> {
    let rules = format!(
        "table inet egress_test {{
  chain input {{
    type filter hook input priority 0; policy accept;
    ip saddr {source4} counter
    ip6 saddr {source6} counter
  }}
}}
"
    );
    crate::process::run_with_input("ip", &["netns", "exec", &ns.name, "nft", "-f", "-"], Some(&rules))?;
    Ok(())
}

/// The sum of the counters installed by [`install_packet_counter`].
pub fn read_packet_counter(ns: &Netns) -> Result<u64> {
    let listing = ns.exec("nft", &["list", "chain", "inet", "egress_test", "input"])?;
    let words: Vec<&str> = listing.split_whitespace().collect();
    let counts: Vec<u64> = words
        .windows(2)
        .filter(|w| w[0] == "packets")
        .map(|w| w[1].parse())
        .collect::<Result<_, _>>()?;
    if counts.len() != 2 {
        anyhow::bail!("expected two counters in the nftables listing:\n{listing}");
    }
    Ok(counts.iter().sum())
}

/// dnsmasq on 127.0.0.1:53 of `ns`, answering A/AAAA from `hosts` (hosts-file lines) and the
/// `srv` records (name, target, port); nothing is forwarded anywhere.
pub fn start_dnsmasq(
    ns: &Netns,
    dir: &Path,
    hosts: &str,
    srv: &[crate::topology::SrvRecord],
) -> Result<Daemon> {
    start_dnsmasq_on(ns, dir, "127.0.0.1", hosts, srv, &[])
}

/// [`start_dnsmasq`] on address `listen` of `ns` (e.g. a container network's gateway), with
/// further dnsmasq options `extra`.
pub fn start_dnsmasq_on(
    ns: &Netns,
    dir: &Path,
    listen: &str,
    hosts: &str,
    srv: &[crate::topology::SrvRecord],
    extra: &[&str],
) -> Result<Daemon> {
    spawn_dnsmasq(Some(&ns.name), dir, listen, hosts, srv, extra)
}

/// [`start_dnsmasq_on`] in this process's own network namespace (the host's resolver, where the
/// test runs on a host of its own: `system.rs`).
pub fn start_dnsmasq_here(
    dir: &Path,
    listen: &str,
    hosts: &str,
    srv: &[crate::topology::SrvRecord],
) -> Result<Daemon> {
    spawn_dnsmasq(None, dir, listen, hosts, srv, &[])
}

fn spawn_dnsmasq(
    netns: Option<&str>,
    dir: &Path,
    listen: &str,
    hosts: &str,
    srv: &[crate::topology::SrvRecord],
    extra: &[&str],
) -> Result<Daemon> {
    let dns = dir.join(format!("dnsmasq-{listen}"));
    fs::create_dir_all(&dns)?;
    let hosts_file = dns.join("hosts");
    fs::write(&hosts_file, hosts)?;
    let pid_file = format!("--pid-file={}", dns.join("dnsmasq.pid").display());
    let listen_arg = format!("--listen-address={listen}");
    let hosts_arg = format!("--addn-hosts={}", hosts_file.display());
    let srv_args: Vec<String> = srv
        .iter()
        .map(|(name, target, port)| format!("--srv-host={name},{target},{port}"))
        .collect();
    let mut args = vec![
        "--keep-in-foreground",
        "--no-resolv",
        "--no-poll",
        "--no-hosts",
        // Authoritative for .test: no REFUSED (no upstream) for a type a name lacks.
        "--local=/test/",
        &listen_arg,
        "--bind-interfaces",
        "--user=root",
        "--log-queries",
        "--log-facility=-",
        &pid_file,
        &hosts_arg,
    ];
    args.extend(srv_args.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let command = launch(netns, Enter::NetAndEtc, None, "dnsmasq", &args);
    Daemon::spawn("dnsmasq", command, &dns.join("dnsmasq.log"))
}
