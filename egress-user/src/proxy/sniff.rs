//! Learning where a redirected connection is going from its first bytes: the server name of a
//! TLS ClientHello, or the Host of an HTTP/1 request head. Pure functions over a byte buffer, no
//! I/O: the caller reads, calls [`sniff`] on everything read so far, and reads again on
//! [`Sniff::NeedMore`] (within its own time limit and at most [`MAX_SNIFF_BYTES`]).
//!
//! The name found goes into a `CONNECT host:port` line to the upstream proxy, so every name
//! returned has passed [`valid_hostname`](crate::hostport::valid_hostname) and is lowercased: it holds only ASCII letters, digits,
//! `-`, `_`, `.`, or is an IP literal (`:` and hex digits for IPv6), and never a space, CR, LF,
//! `/` or `@`. The caller adds brackets around an IPv6 host.
//!
//! Choices made here:
//! - The first byte decides: `0x16` is TLS (if `0x03 0x00..=0x04` follows; else `Other`), an
//!   uppercase letter may be HTTP, anything else is `Other` at once.
//! - Only the first [`MAX_SNIFF_BYTES`] of `buf` are looked at; what is still undecided there
//!   is given up on: `Tls { sni: None }` or `Http { host: None, port: None }`.
//! - The answer depends only on the bytes already seen: once [`sniff`] returns `Done(x)` for a
//!   buffer, it returns `Done(x)` for any longer buffer that starts with it.
//! - TLS: the first handshake message, reassembled from as many handshake records as it takes,
//!   must be a ClientHello and is walked in full (not only up to the server_name extension)
//!   before an answer is given, so a malformed hello never yields a name. A length that
//!   overruns its container, a record of another type before the hello is complete, a record
//!   longer than 2^14 bytes or empty, a hello that could never fit in [`MAX_SNIFF_BYTES`],
//!   two server_name extensions, or trailing bytes after the extensions all make it
//!   `Tls { sni: None }`. So do two host_name entries in the server name list (RFC 6066
//!   forbids it; as with two Host headers, the name is ambiguous).
//! - A trailing dot is stripped from the SNI and the Host before validation
//!   (`example.org.` → `example.org`). An IP literal in the SNI gives `sni: None`.
//! - HTTP: a request starts with an uppercase method token (`A`-`Z`, then also `-` and `_`, as
//!   in `VERSION-CONTROL`; at most 20 bytes) and a space; leading empty lines are not skipped.
//!   A head with more than 100 headers gives `Http { host: None, port: None }`.
//! - Host: `host[:port]` or `[ipv6][:port]`; `host:` (empty port) means no port; port 0,
//!   signs and non-digits make the whole Host invalid. IPv6 is returned in its canonical
//!   text form (`[2001:DB8:0::1]` → `2001:db8::1`); an unbracketed IPv6 is invalid.
//! - Absolute-form targets (`GET http://host[:port]/ HTTP/1.1`, scheme `http` or `https`) give
//!   the host when there is no Host header; when both are there, they must agree on host and
//!   port, else there is no host. A userinfo (`user@`) in the target makes it invalid.
//! - `valid_hostname` also refuses DNS names whose last label starts with a digit, such as
//!   `1.2.3`, `127.1` or `0x7f.1`: resolvers read those as IPv4 addresses (`inet_aton`), and no
//!   top-level domain starts with a digit. Dotted-quad IPv4 is accepted as an IP literal.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{hostport::valid_hostname, route::plan::Sniffed};

/// Upper bound on bytes the agent buffers while sniffing; past it, give up (Done with no name).
pub const MAX_SNIFF_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff {
    Done(Sniffed),
    NeedMore,
}

/// Classify the first bytes of a connection. Returns NeedMore only while the bytes so far are a valid but
/// incomplete prefix of a ClientHello / request head and buf.len() < MAX_SNIFF_BYTES.
pub fn sniff(buf: &[u8]) -> Sniff {
    let buf = &buf[..buf.len().min(MAX_SNIFF_BYTES)];
    let (sniffed, give_up) = match buf.first() {
        None => return Sniff::NeedMore,
        Some(&CONTENT_HANDSHAKE) => (sniff_tls(buf), Sniffed::Tls { sni: None }),
        Some(_) => (
            sniff_http(buf),
            Sniffed::Http {
                host: None,
                port: None,
            },
        ),
    };
    match sniffed {
        Sniff::NeedMore if buf.len() >= MAX_SNIFF_BYTES => Sniff::Done(give_up),
        sniffed => sniffed,
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Largest TLSPlaintext fragment (RFC 8446 §5.1).
const MAX_RECORD_LEN: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// Why a parse stopped short of an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The bytes so far are a valid prefix: more may complete them.
    Incomplete,
    /// No continuation can make these bytes valid.
    Malformed,
}

fn sniff_tls(buf: &[u8]) -> Sniff {
    // 0x16 0x03 0x00..=0x04: anything else is not TLS at all.
    if buf.get(1).is_some_and(|&b| b != 3) || buf.get(2).is_some_and(|&b| b > 4) {
        return Sniff::Done(Sniffed::Other);
    }
    match client_hello_sni(buf) {
        Ok(sni) => Sniff::Done(Sniffed::Tls { sni }),
        Err(Stop::Incomplete) => Sniff::NeedMore,
        Err(Stop::Malformed) => Sniff::Done(Sniffed::Tls { sni: None }),
    }
}

fn client_hello_sni(buf: &[u8]) -> Result<Option<String>, Stop> {
    let (handshake, records) = handshake_bytes(buf);
    match parse_client_hello(&handshake) {
        // The record layer went wrong after the bytes gathered: no continuation helps.
        Err(Stop::Incomplete) => Err(records.err().unwrap_or(Stop::Incomplete)),
        parsed => parsed,
    }
}

/// Length of the first handshake message, header included, once its header is there.
fn handshake_message_len(handshake: &[u8]) -> Option<usize> {
    match handshake {
        [_, a, b, c, ..] => Some(HANDSHAKE_HEADER_LEN + u32::from_be_bytes([0, *a, *b, *c]) as usize),
        _ => None,
    }
}

/// The handshake-layer bytes carried by the handshake records at the start of `buf`, gathered
/// until the first handshake message is complete, and why the gathering stopped: `Ok` when the
/// message is complete, `Err(Incomplete)` at the end of `buf`, `Err(Malformed)` at a bad record.
fn handshake_bytes(buf: &[u8]) -> (Cow<'_, [u8]>, Result<(), Stop>) {
    let mut handshake: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut rest = buf;
    loop {
        if handshake_message_len(&handshake).is_some_and(|len| handshake.len() >= len) {
            return (handshake, Ok(()));
        }
        let len = match record_header(rest) {
            Ok(len) => len,
            Err(stop) => return (handshake, Err(stop)),
        };
        let body = &rest[RECORD_HEADER_LEN..];
        let fragment = &body[..len.min(body.len())];
        if handshake.is_empty() {
            handshake = Cow::Borrowed(fragment);
        } else {
            handshake.to_mut().extend_from_slice(fragment);
        }
        if fragment.len() < len {
            // The last record is cut short: this is the end of `buf`.
            let complete = handshake_message_len(&handshake).is_some_and(|len| handshake.len() >= len);
            return (handshake, if complete { Ok(()) } else { Err(Stop::Incomplete) });
        }
        rest = &body[len..];
    }
}

/// Checks the header of the handshake record at the start of `rest` and returns its length.
fn record_header(rest: &[u8]) -> Result<usize, Stop> {
    let valid_prefix = rest.first().is_none_or(|&b| b == CONTENT_HANDSHAKE)
        && rest.get(1).is_none_or(|&b| b == 3)
        && rest.get(2).is_none_or(|&b| b <= 4);
    if !valid_prefix {
        return Err(Stop::Malformed);
    }
    let [_, _, _, hi, lo, ..] = *rest else {
        return Err(Stop::Incomplete);
    };
    match usize::from(u16::from_be_bytes([hi, lo])) {
        0 => Err(Stop::Malformed),
        len if len > MAX_RECORD_LEN => Err(Stop::Malformed),
        len => Ok(len),
    }
}

/// Walks a ClientHello handshake message (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2) given a prefix of
/// it (or more), and returns its server name.
fn parse_client_hello(handshake: &[u8]) -> Result<Option<String>, Stop> {
    match handshake.first() {
        None => return Err(Stop::Incomplete),
        Some(&HANDSHAKE_CLIENT_HELLO) => {}
        Some(_) => return Err(Stop::Malformed),
    }
    let len = handshake_message_len(handshake).ok_or(Stop::Incomplete)?;
    if RECORD_HEADER_LEN + len > MAX_SNIFF_BYTES {
        return Err(Stop::Malformed);
    }
    let mut hello = Reader {
        data: &handshake[..handshake.len().min(len)],
        pos: HANDSHAKE_HEADER_LEN,
        end: len,
    };
    hello.skip(2)?; // legacy_version
    hello.skip(32)?; // random
    let session_id = hello.u8()?;
    if session_id > 32 {
        return Err(Stop::Malformed);
    }
    hello.skip(session_id.into())?;
    let cipher_suites = hello.u16()?;
    if cipher_suites == 0 || cipher_suites % 2 != 0 {
        return Err(Stop::Malformed);
    }
    hello.skip(cipher_suites.into())?;
    let compression_methods = hello.u8()?;
    if compression_methods == 0 {
        return Err(Stop::Malformed);
    }
    hello.skip(compression_methods.into())?;

    let mut sni = None;
    if !hello.at_end() {
        let mut extensions = hello.sub_u16()?;
        if !hello.at_end() {
            return Err(Stop::Malformed);
        }
        let mut seen_server_name = false;
        while !extensions.at_end() {
            let ext_type = extensions.u16()?;
            let mut ext = extensions.sub_u16()?;
            if ext_type == EXT_SERVER_NAME {
                if seen_server_name {
                    return Err(Stop::Malformed);
                }
                seen_server_name = true;
                sni = server_name(&mut ext)?;
            }
        }
    }
    // The answer needs the whole message, so that a malformed tail is never missed.
    if handshake.len() < len {
        return Err(Stop::Incomplete);
    }
    Ok(sni)
}

/// The server_name extension's body (RFC 6066 §3): the validated host_name, if exactly one.
fn server_name(ext: &mut Reader<'_>) -> Result<Option<String>, Stop> {
    let mut list = ext.sub_u16()?;
    if !ext.at_end() || list.at_end() {
        return Err(Stop::Malformed);
    }
    let mut host_names = 0;
    let mut name: &[u8] = &[];
    while !list.at_end() {
        let name_type = list.u8()?;
        let len = list.u16()?;
        if len == 0 {
            return Err(Stop::Malformed);
        }
        let bytes = list.bytes(len.into())?;
        if name_type == NAME_TYPE_HOST_NAME {
            host_names += 1;
            name = bytes;
        }
    }
    if host_names != 1 {
        return Ok(None);
    }
    let Ok(name) = std::str::from_utf8(name) else {
        return Ok(None);
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let ip = name.parse::<Ipv4Addr>().is_ok() || name.parse::<Ipv6Addr>().is_ok();
    Ok((!ip && valid_hostname(name)).then(|| name.to_ascii_lowercase()))
}

/// Reads big-endian fields from `data`, a prefix of a structure that ends at `end`. Reading past
/// `end` is malformed; reading past the bytes available (but not past `end`) is incomplete.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn at_end(&self) -> bool {
        self.pos >= self.end
    }

    /// Claims the next `n` bytes: checks them against `end` and moves past them.
    fn advance(&mut self, n: usize) -> Result<usize, Stop> {
        let start = self.pos;
        let next = start.checked_add(n).ok_or(Stop::Malformed)?;
        if next > self.end {
            return Err(Stop::Malformed);
        }
        self.pos = next;
        Ok(start)
    }

    fn skip(&mut self, n: usize) -> Result<(), Stop> {
        self.advance(n).map(drop)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        let start = self.advance(n)?;
        self.data.get(start..start + n).ok_or(Stop::Incomplete)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A structure behind a 16-bit length: a reader over it, whose bytes this one moves past.
    fn sub_u16(&mut self) -> Result<Reader<'a>, Stop> {
        let len = self.u16()?;
        let start = self.advance(len.into())?;
        Ok(Reader {
            data: self.data,
            pos: start,
            end: self.pos,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1

const MAX_METHOD_LEN: usize = 20;
const MAX_HEADERS: usize = 100;

fn sniff_http(buf: &[u8]) -> Sniff {
    if !buf[0].is_ascii_uppercase() {
        return Sniff::Done(Sniffed::Other);
    }
    let method_len = buf
        .iter()
        .take(MAX_METHOD_LEN + 1)
        .take_while(|&&b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
        .count();
    if method_len > MAX_METHOD_LEN {
        return Sniff::Done(Sniffed::Other);
    }
    match buf.get(method_len) {
        None => return Sniff::NeedMore,
        Some(b' ') => {}
        Some(_) => return Sniff::Done(Sniffed::Other),
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) => Sniff::NeedMore,
        Ok(httparse::Status::Complete(_)) => {
            let (host, port) = request_authority(&request).unzip();
            Sniff::Done(Sniffed::Http {
                host,
                port: port.flatten(),
            })
        }
        Err(httparse::Error::TooManyHeaders) => Sniff::Done(Sniffed::Http {
            host: None,
            port: None,
        }),
        Err(_) => Sniff::Done(Sniffed::Other),
    }
}

type Authority = (String, Option<u16>);

/// The host and port a complete request head is for: its single Host header and/or its
/// absolute-form target, which must agree when both are there.
fn request_authority(request: &httparse::Request<'_, '_>) -> Option<Authority> {
    let mut hosts = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let header = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(host), None) => Some(parse_authority(host.value)),
        (Some(_), Some(_)) => return None,
    };
    let target = request.path.and_then(absolute_form_authority);
    match (header, target) {
        (Some(header), Some(target)) => header.filter(|h| Some(h) == target.as_ref()),
        (header, target) => header.or(target).flatten(),
    }
}

/// For an absolute-form `http(s)://authority/...` target, its authority, `None` inside if invalid.
fn absolute_form_authority(target: &str) -> Option<Option<Authority>> {
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    Some(parse_authority(authority.as_bytes()))
}

/// `host[:port]` or `[ipv6][:port]`, validated; the host lowercased, IPv6 canonical and unbracketed.
fn parse_authority(value: &[u8]) -> Option<Authority> {
    let value = std::str::from_utf8(value).ok()?.trim_matches([' ', '\t']);
    let (host, port) = if let Some(bracketed) = value.strip_prefix('[') {
        let (ipv6, after) = bracketed.split_once(']')?;
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':')?),
        };
        (ipv6.parse::<Ipv6Addr>().ok()?.to_string(), port)
    } else {
        let (host, port) = match value.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if !valid_hostname(host) || host.contains(':') {
            return None;
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None | Some("") => None,
        Some(port) => Some(parse_port(port)?),
    };
    Some((host, port))
}

fn parse_port(port: &str) -> Option<u16> {
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok().filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(sni: Option<&str>) -> Sniff {
        Sniff::Done(Sniffed::Tls {
            sni: sni.map(str::to_owned),
        })
    }

    fn http(host: Option<&str>, port: Option<u16>) -> Sniff {
        Sniff::Done(Sniffed::Http {
            host: host.map(str::to_owned),
            port,
        })
    }

    const OTHER: Sniff = Sniff::Done(Sniffed::Other);

    fn unhex(hex: &str) -> Vec<u8> {
        let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    // ClientHellos sent by `openssl s_client` (OpenSSL 3.0), captured on loopback.

    /// `-servername Example.ORG`: TLS 1.3 style (supported_versions, key_share), one record.
    const OPENSSL_TLS13_SNI: &str = "\
        1603010138010001340303c8f6b96f24afd8d4d7b7416e3c28ff6de51fe2d8f56505f0412a94f15c7ad47f200619de37\
        63de383143a1864bb241e62e6f69dd97385adb74dd0dd283e0909988003e130213031301c02cc030009fcca9cca8ccaa\
        c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010000ad\
        00000010000e00000b4578616d706c652e4f5247000b000403000102000a00160014001d0017001e0019001801000101\
        010201030104002300000016000000170000000d002a0028040305030603080708080809080a080b0804080508060401\
        05010601030303010302040205020602002b0009080304030303020301002d00020101003300260024001d002058ce67\
        862026be7b85497457834dd2dafeffe68523bd9377a20cb2f3fc73375d";

    /// `-servername matrix.example.org -tls1_2`: TLS 1.2 style, no session id.
    const OPENSSL_TLS12_SNI: &str = "\
        16030100d2010000ce0303bd26c10935fdb3eb69cfd4052eab1b53d8d30c8bee093c69b4689697c60da26e000038c02c\
        c030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c\
        0035002f00ff0100006d0000001700150000126d61747269782e6578616d706c652e6f7267000b000403000102000a00\
        0c000a001d0017001e00190018002300000016000000170000000d002a0028040305030603080708080809080a080b08\
        0408050806040105010601030303010302040205020602";

    /// `-noservername -groups X25519`: TLS 1.3 style without server_name.
    const OPENSSL_TLS13_NO_SNI: &str = "\
        16030101120100010e0303d1ad270484a7f6dbe420e1238ffc6b2a1c4f7cf9573e70561090e1d90d9a258020e135d8e0\
        f48a3ecec7010611e2ded3b6a38e11bd9587c82ed1c3aa027a8541e0003e130213031301c02cc030009fcca9cca8ccaa\
        c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff01000087\
        000b000403000102000a00040002001d002300000016000000170000000d002a0028040305030603080708080809080a\
        080b080408050806040105010601030303010302040205020602002b0009080304030303020301002d00020101003300\
        260024001d0020cc702225594f4a678c02adb0e7487e879b86261801b633c415a7c7feb7721d02";

    fn captures() -> Vec<(&'static str, Vec<u8>, Sniff)> {
        vec![
            ("tls13 sni", unhex(OPENSSL_TLS13_SNI), tls(Some("example.org"))),
            (
                "tls12 sni",
                unhex(OPENSSL_TLS12_SNI),
                tls(Some("matrix.example.org")),
            ),
            ("tls13 no sni", unhex(OPENSSL_TLS13_NO_SNI), tls(None)),
        ]
    }

    /// `handshake` (handshake-layer bytes) in handshake records of at most `size` bytes each.
    fn records(handshake: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in handshake.chunks(size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// Same records, cut at the given handshake offsets.
    fn records_at(handshake: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&handshake.len()]) {
            out.extend(records(&handshake[start..end], usize::MAX));
            start = end;
        }
        out
    }

    fn with_len16(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn server_name_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend(with_len16(name));
        }
        let mut ext = vec![0, 0];
        ext.extend(with_len16(&with_len16(&list)));
        ext
    }

    /// A ClientHello handshake message (header included) with the given extensions block.
    fn hello_with(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([0xab; 32]); // random
        body.push(32);
        body.extend([0xcd; 32]); // session id
        body.extend(with_len16(&[0x13, 0x01, 0x13, 0x02]));
        body.extend([1, 0]); // compression: null
        body.extend(with_len16(extensions));
        let mut msg = vec![1];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    fn hello_sni(name: &[u8]) -> Vec<u8> {
        let mut exts = vec![0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]; // supported_versions: 1.3
        exts.extend(server_name_ext(&[(0, name)]));
        exts.extend([0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]); // supported_groups
        hello_with(&exts)
    }

    /// Handshake bytes of a captured single-record hello.
    fn handshake_of(capture: &[u8]) -> &[u8] {
        &capture[RECORD_HEADER_LEN..]
    }

    #[test]
    fn captured_client_hellos() {
        for (name, bytes, expected) in captures() {
            assert_eq!(sniff(&bytes), expected, "{name}");
            let mut more = bytes.clone();
            more.extend([0x14, 0x03, 0x03, 0x00, 0x01, 0x01, 0xff, 0x00]);
            assert_eq!(sniff(&more), expected, "{name}: followed by more bytes");
        }
    }

    #[test]
    fn every_prefix_needs_more() {
        let mut inputs = captures();
        for (name, bytes, expected) in captures() {
            let handshake = handshake_of(&bytes).to_vec();
            for size in [1, 7, 64, 100] {
                inputs.push((name, records(&handshake, size), expected.clone()));
            }
        }
        let synthetic = hello_sni(b"Matrix.Example.ORG.");
        inputs.push((
            "synthetic",
            records(&synthetic, usize::MAX),
            tls(Some("matrix.example.org")),
        ));
        for (name, bytes, expected) in inputs {
            for len in 0..bytes.len() {
                assert_eq!(
                    sniff(&bytes[..len]),
                    Sniff::NeedMore,
                    "{name}: {len} of {} bytes",
                    bytes.len()
                );
            }
            assert_eq!(sniff(&bytes), expected, "{name}: {} bytes", bytes.len());
        }
    }

    #[test]
    fn sni_split_across_records() {
        let mut tested = 0;
        for (name, bytes, expected) in captures() {
            let handshake = handshake_of(&bytes);
            let Some(at) = handshake
                .windows(7)
                .position(|w| w.eq_ignore_ascii_case(b"example"))
            else {
                continue;
            };
            tested += 1;
            for cuts in [vec![at + 3], vec![2, at, at + 1, at + 9], vec![at - 5, at + 2]] {
                assert_eq!(
                    sniff(&records_at(handshake, &cuts)),
                    expected,
                    "{name}: cut at {cuts:?}"
                );
            }
        }
        assert_eq!(tested, 2, "both captures with a server name");
    }

    #[test]
    fn sni_names() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"example.org", Some("example.org")),
            (b"EXAMPLE.org", Some("example.org")),
            (b"example.org.", Some("example.org")),
            (b"_matrix._tcp.example-1.org", Some("_matrix._tcp.example-1.org")),
            (b"xn--bcher-kva.example", Some("xn--bcher-kva.example")),
            (b"localhost", Some("localhost")),
            (b"1.2.3.4", None),
            (b"::1", None),
            (b"[::1]", None),
            (b"127.1", None),
            (b"a b.org", None),
            (b"a.org\r\nX: y", None),
            (b"a.org:443", None),
            (b"a.org/x", None),
            (b"user@a.org", None),
            (b"a.org\0", None),
            (b"b\xc3\xbccher.example", None),
            (b"\xff\xfe", None),
            (b".", None),
            (b"a..b", None),
            (&[b'a'; 64], None),
        ];
        for (name, expected) in cases {
            let bytes = records(&hello_sni(name), usize::MAX);
            assert_eq!(
                sniff(&bytes),
                tls(*expected),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
        let long = [b"a".repeat(63).as_slice(); 4].join(&b'.');
        assert_eq!(
            sniff(&records(&hello_sni(&long), usize::MAX)),
            tls(None),
            "255 bytes"
        );
        let long = &long[..253];
        let expected = std::str::from_utf8(long).unwrap();
        assert_eq!(
            sniff(&records(&hello_sni(long), usize::MAX)),
            tls(Some(expected)),
            "253 bytes"
        );
    }

    #[test]
    fn server_name_list_entries() {
        let ext = |entries: &[(u8, &[u8])]| records(&hello_with(&server_name_ext(entries)), usize::MAX);
        assert_eq!(sniff(&ext(&[(0, b"a.org")])), tls(Some("a.org")));
        assert_eq!(
            sniff(&ext(&[(7, b"x"), (0, b"a.org")])),
            tls(Some("a.org")),
            "other type first"
        );
        assert_eq!(
            sniff(&ext(&[(0, b"a.org"), (7, b"x")])),
            tls(Some("a.org")),
            "other type after"
        );
        assert_eq!(sniff(&ext(&[(7, b"a.org")])), tls(None), "no host_name");
        assert_eq!(
            sniff(&ext(&[(0, b"a.org"), (0, b"b.org")])),
            tls(None),
            "two host_names"
        );
        assert_eq!(sniff(&ext(&[(0, b"")])), tls(None), "empty host_name");
        assert_eq!(sniff(&ext(&[])), tls(None), "empty list");
        let mut two = server_name_ext(&[(0, b"a.org")]);
        two.extend(server_name_ext(&[(0, b"a.org")]));
        assert_eq!(
            sniff(&records(&hello_with(&two), usize::MAX)),
            tls(None),
            "two extensions"
        );
        // No extensions block at all (SSLv3 / TLS 1.0 style).
        let mut bare = hello_with(&[]);
        bare.truncate(bare.len() - 2);
        bare[3] -= 2;
        assert_eq!(sniff(&records(&bare, usize::MAX)), tls(None), "no extensions");
    }

    #[test]
    fn malformed_client_hellos() {
        let good = hello_sni(b"a.org");
        assert_eq!(sniff(&records(&good, usize::MAX)), tls(Some("a.org")));
        // Offsets in `good`: header 0..4, version 4..6, random 6..38, session id len 38,
        // cipher suites len 71..73, compression len 77, extensions len 79..81.
        let patch = |at: usize, bytes: &[u8]| {
            let mut hello = good.clone();
            hello[at..at + bytes.len()].copy_from_slice(bytes);
            hello
        };
        let exts_start = 81;
        let sni_at = exts_start + 7;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("not a ClientHello", patch(0, &[2])),
            ("message longer than its content", patch(1, &[0, 0, good[3] + 1])),
            ("message shorter than its content", patch(1, &[0, 0, good[3] - 1])),
            ("session id over 32", patch(38, &[33])),
            ("odd cipher suites length", patch(71, &[0, 3])),
            ("no cipher suites", patch(71, &[0, 0])),
            ("cipher suites overrun", patch(71, &[0xff, 0xff])),
            ("no compression methods", patch(77, &[0])),
            ("extensions overrun", patch(79, &[0x01, 0x00])),
            (
                "extensions short of the end",
                patch(79, &(good.len() as u16 - 82).to_be_bytes()),
            ),
            (
                "extension overruns the block",
                patch(exts_start + 2, &[0x10, 0x00]),
            ),
            ("server name list overruns", patch(sni_at + 4, &[0x00, 0x40])),
            ("server name list short", patch(sni_at + 4, &[0x00, 0x07])),
            ("host_name overruns the list", patch(sni_at + 7, &[0x00, 0x06])),
        ];
        for (name, hello) in cases {
            let bytes = records(&hello, usize::MAX);
            assert_eq!(sniff(&bytes), tls(None), "{name}");
        }
        // Length overruns that no continuation can fix are decided before the message is complete.
        let early: Vec<(&str, Vec<u8>, usize)> = vec![
            ("session id over 32", patch(38, &[33]), 39),
            ("cipher suites overrun", patch(71, &[0xff, 0xff]), 73),
            ("extensions overrun", patch(79, &[0x01, 0x00]), 81),
            (
                "extension overruns the block",
                patch(exts_start + 2, &[0x10, 0x00]),
                exts_start + 4,
            ),
            ("not a ClientHello", patch(0, &[2]), 1),
        ];
        for (name, hello, known_at) in early {
            let bytes = records(&hello, usize::MAX);
            let cut = RECORD_HEADER_LEN + known_at;
            assert_eq!(sniff(&bytes[..cut - 1]), Sniff::NeedMore, "{name}: before");
            assert_eq!(sniff(&bytes[..cut]), tls(None), "{name}: at");
        }
    }

    #[test]
    fn malformed_records() {
        let hello = hello_sni(b"a.org");
        let split = records(&hello, 50);
        let mut second_record_type = split.clone();
        second_record_type[RECORD_HEADER_LEN + 50] = 0x17;
        let mut second_record_version = split.clone();
        second_record_version[RECORD_HEADER_LEN + 50 + 1] = 0x02;
        let cases: &[(&str, &[u8], Sniff)] = &[
            ("not TLS: version major", &[0x16, 0x02], OTHER),
            ("not TLS: version minor", &[0x16, 0x03, 0x05], OTHER),
            ("SSL 3.0 record", &[0x16, 0x03, 0x00], Sniff::NeedMore),
            ("empty record", &[0x16, 0x03, 0x01, 0x00, 0x00], tls(None)),
            ("record over 2^14", &[0x16, 0x03, 0x01, 0x40, 0x01], tls(None)),
            ("record of 2^14", &[0x16, 0x03, 0x01, 0x40, 0x00], Sniff::NeedMore),
            (
                "message that cannot fit",
                &[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x40, 0x00],
                tls(None),
            ),
            (
                "biggest that fits",
                &[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x3f, 0xf7],
                Sniff::NeedMore,
            ),
            ("second record of another type", &second_record_type, tls(None)),
            ("second record not TLS", &second_record_version, tls(None)),
            ("alert", &[0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x28], OTHER),
        ];
        for (name, bytes, expected) in cases {
            assert_eq!(sniff(bytes), *expected, "{name}");
        }
        // A bad record after the hello is complete changes nothing.
        let mut after = records(&hello, usize::MAX);
        after.extend([0x17, 0x03, 0x03, 0x00, 0x00]);
        assert_eq!(sniff(&after), tls(Some("a.org")));
    }

    #[test]
    fn gives_up_at_the_limit() {
        // Padding makes a hello that fits in the limit in one record, but not in 1-byte records.
        let mut exts = server_name_ext(&[(0, b"a.org")]);
        exts.extend([0x00, 0x15]);
        exts.extend(with_len16(&[0; 6000]));
        let hello = hello_with(&exts);
        assert_eq!(sniff(&records(&hello, usize::MAX)), tls(Some("a.org")));
        let tiny = records(&hello, 1);
        assert!(tiny.len() > MAX_SNIFF_BYTES);
        assert_eq!(sniff(&tiny[..MAX_SNIFF_BYTES - 1]), Sniff::NeedMore);
        assert_eq!(sniff(&tiny[..MAX_SNIFF_BYTES]), tls(None));
        assert_eq!(sniff(&tiny), tls(None));

        let mut head = b"GET / HTTP/1.1\r\nHost: a.org\r\nX-Pad: ".to_vec();
        head.resize(MAX_SNIFF_BYTES + 10, b'a');
        assert_eq!(sniff(&head[..MAX_SNIFF_BYTES - 1]), Sniff::NeedMore);
        assert_eq!(sniff(&head[..MAX_SNIFF_BYTES]), http(None, None));
        assert_eq!(sniff(&head), http(None, None));
    }

    #[test]
    fn host_headers() {
        // The value of the one Host header in `GET / HTTP/1.1`, and the host and port it gives.
        let cases: &[(&str, Option<&str>, Option<u16>)] = &[
            ("example.org", Some("example.org"), None),
            ("example.org:8448", Some("example.org"), Some(8448)),
            ("Matrix.Example.ORG", Some("matrix.example.org"), None),
            ("example.org.", Some("example.org"), None),
            ("example.org.:443", Some("example.org"), Some(443)),
            ("\t example.org \t", Some("example.org"), None),
            ("example.org:", Some("example.org"), None),
            ("example.org:00080", Some("example.org"), Some(80)),
            ("a.com:80 ", Some("a.com"), Some(80)),
            ("localhost", Some("localhost"), None),
            ("xn--bcher-kva.example", Some("xn--bcher-kva.example"), None),
            ("192.0.2.1:80", Some("192.0.2.1"), Some(80)),
            ("[2001:DB8:0::1]:8080", Some("2001:db8::1"), Some(8080)),
            ("[::1]", Some("::1"), None),
            ("[::FFFF:192.0.2.1]", Some("::ffff:192.0.2.1"), None),
            ("", None, None),
            ("a b", None, None),
            ("a.com/x", None, None),
            ("a.com?x", None, None),
            ("a.com#x", None, None),
            ("user@a.com", None, None),
            ("a.com:80:80", None, None),
            ("a.com:0", None, None),
            ("a.com:65536", None, None),
            ("a.com:+80", None, None),
            ("a.com:-1", None, None),
            ("a.com:http", None, None),
            ("a.com :80", None, None),
            (":80", None, None),
            ("::1", None, None),
            ("[::1", None, None),
            ("[::1]x", None, None),
            ("[::1]:", Some("::1"), None),
            ("[a.org]", None, None),
            ("[192.0.2.1]", None, None),
            ("[fe80::1%eth0]", None, None),
            ("[v1.x]", None, None),
            ("127.1", None, None),
            ("0x7f000001", None, None),
            ("b\u{fc}cher.example", None, None),
            ("a..org", None, None),
            (".", None, None),
        ];
        for (value, host, port) in cases {
            let head = format!("GET / HTTP/1.1\r\nHost: {value}\r\nAccept: */*\r\n\r\n");
            assert_eq!(sniff(head.as_bytes()), http(*host, *port), "{value:?}");
        }
    }

    #[test]
    fn http_heads() {
        let cases: &[(&str, Sniff)] = &[
            ("GET / HTTP/1.1\r\nHost: a.org\r\n\r\n", http(Some("a.org"), None)),
            ("GET / HTTP/1.1\r\nhOsT: a.org\r\n\r\n", http(Some("a.org"), None)),
            ("GET / HTTP/1.1\nHost: a.org\n\n", http(Some("a.org"), None)),
            (
                "OPTIONS * HTTP/1.1\r\nHost: a.org\r\n\r\n",
                http(Some("a.org"), None),
            ),
            (
                "VERSION-CONTROL / HTTP/1.1\r\nHost: a.org\r\n\r\n",
                http(Some("a.org"), None),
            ),
            (
                "PUT /x HTTP/1.1\r\nHost: a.org\r\nContent-Length: 2\r\n\r\n{}",
                http(Some("a.org"), None),
            ),
            // Missing or duplicate Host.
            ("GET / HTTP/1.0\r\n\r\n", http(None, None)),
            ("GET / HTTP/1.1\r\nHost:\r\n\r\n", http(None, None)),
            (
                "GET / HTTP/1.1\r\nHost: a.org\r\nHost: a.org\r\n\r\n",
                http(None, None),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a.org\r\nhost: b.org\r\n\r\n",
                http(None, None),
            ),
            // Injection attempts: httparse splits lines at LF and refuses control bytes in values.
            (
                "GET / HTTP/1.1\r\nHost: a.com\r\nX: y\r\n\r\n",
                http(Some("a.com"), None),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a.com\nX: y\r\n\r\n",
                http(Some("a.com"), None),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a.com\nHost: b.com\r\n\r\n",
                http(None, None),
            ),
            ("GET / HTTP/1.1\r\nHost: a.com\rX: y\r\n\r\n", OTHER),
            ("GET / HTTP/1.1\r\nHost: a.com\0\r\n\r\n", OTHER),
            ("GET / HTTP/1.1\r\nHost: a.com\r\n b.com\r\n\r\n", OTHER),
            ("GET / HTTP/1.1\r\nHost : a.com\r\n\r\n", OTHER),
            // Absolute-form targets: used without a Host header, must agree with one.
            (
                "GET http://Example.org:8008/x HTTP/1.1\r\n\r\n",
                http(Some("example.org"), Some(8008)),
            ),
            ("GET HTTPS://[::1]/ HTTP/1.1\r\n\r\n", http(Some("::1"), None)),
            ("GET http://a.org?q HTTP/1.1\r\n\r\n", http(Some("a.org"), None)),
            (
                "GET http://a.org/ HTTP/1.1\r\nHost: A.org\r\n\r\n",
                http(Some("a.org"), None),
            ),
            (
                "GET http://a.org/ HTTP/1.1\r\nHost: b.org\r\n\r\n",
                http(None, None),
            ),
            (
                "GET http://a.org/ HTTP/1.1\r\nHost: a.org:80\r\n\r\n",
                http(None, None),
            ),
            (
                "GET http://a.org/ HTTP/1.1\r\nHost: a b\r\n\r\n",
                http(None, None),
            ),
            ("GET http://u@a.org/ HTTP/1.1\r\n\r\n", http(None, None)),
            (
                "GET http://u@a.org/ HTTP/1.1\r\nHost: a.org\r\n\r\n",
                http(None, None),
            ),
            ("GET http:///x HTTP/1.1\r\n\r\n", http(None, None)),
            ("GET ftp://a.org/ HTTP/1.1\r\n\r\n", http(None, None)),
            (
                "GET ftp://a.org/ HTTP/1.1\r\nHost: b.org\r\n\r\n",
                http(Some("b.org"), None),
            ),
            (
                "GET /?u=http://b.org/ HTTP/1.1\r\nHost: a.org\r\n\r\n",
                http(Some("a.org"), None),
            ),
            // Not HTTP/1.
            ("get / HTTP/1.1\r\nHost: a.org\r\n\r\n", OTHER),
            ("GET\t/ HTTP/1.1\r\n\r\n", OTHER),
            ("GET  / HTTP/1.1\r\n\r\n", OTHER),
            ("GET / HTTP/2.0\r\n\r\n", OTHER),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", OTHER),
            ("\r\nGET / HTTP/1.1\r\nHost: a.org\r\n\r\n", OTHER),
            ("ABCDEFGHIJKLMNOPQRSTU / HTTP/1.1\r\n\r\n", OTHER),
            ("GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", OTHER),
        ];
        for (head, expected) in cases {
            assert_eq!(sniff(head.as_bytes()), *expected, "{head:?}");
        }
        let mut many = "GET / HTTP/1.1\r\nHost: a.org\r\n".to_owned();
        many.push_str(&"X: y\r\n".repeat(MAX_HEADERS));
        many.push_str("\r\n");
        assert_eq!(sniff(many.as_bytes()), http(None, None), "too many headers");
    }

    #[test]
    fn http_prefixes_need_more() {
        let heads: &[(&str, Sniff)] = &[
            (
                "GET / HTTP/1.1\r\nHost: example.org:8448\r\n\r\n",
                http(Some("example.org"), Some(8448)),
            ),
            ("GET / HTTP/1.1\nHost: [::1]\n\n", http(Some("::1"), None)),
            (
                "VERSION-CONTROL / HTTP/1.1\r\nHost: a.org\r\n\r\n",
                http(Some("a.org"), None),
            ),
        ];
        for (head, expected) in heads {
            for len in 0..head.len() {
                assert_eq!(
                    sniff(&head.as_bytes()[..len]),
                    Sniff::NeedMore,
                    "{:?}",
                    &head[..len]
                );
            }
            assert_eq!(sniff(head.as_bytes()), *expected, "{head:?}");
        }
    }

    #[test]
    fn server_speaks_first_and_garbage() {
        let cases: &[(&[u8], Sniff)] = &[
            (b"", Sniff::NeedMore),
            (b"G", Sniff::NeedMore),
            (b"SSH", Sniff::NeedMore),
            (b"SSH-", Sniff::NeedMore),
            (b"SSH-2.0-OpenSSH_9.6\r\n", OTHER),
            (b"220 smtp.example ESMTP\r\n", OTHER),
            (b"\x00", OTHER),
            (b"\x00\xff\x13\x37", OTHER),
            (b"\xff\xfe\xfd", OTHER),
            (b"\x80\x2e\x01\x03\x01", OTHER), // SSLv2-style hello
            (b"\x16", Sniff::NeedMore),
            (b"\x16\x03", Sniff::NeedMore),
            (b"\x16\x16\x16", OTHER),
            (b" GET / HTTP/1.1\r\n\r\n", OTHER),
            (b"ABCDEFGHIJKLMNOPQRST", Sniff::NeedMore),
            (b"ABCDEFGHIJKLMNOPQRSTU", OTHER),
        ];
        for (bytes, expected) in cases {
            assert_eq!(sniff(bytes), *expected, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
