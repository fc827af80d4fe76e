//! The hybrid-vsock handshake: the one line that opens a host stream and the one line that
//! answers it. The VMM's muxer, the agent's listener and the runtime's client all use this
//! codec, so they cannot drift apart again (they once disagreed on `ERROR` vs `ERR`).
//!
//! - `CONNECT <port>\n` to the VMM's socket (or the agent's host-mode socket) asks for a stream
//!   to guest `<port>`; answered `OK <port>\n` (from the VMM: the host-side local port).
//! - `STDIO <name>\n` opens a stream to [`crate::STDIO_PORT`]; answered `OK\n`.
//! - `FORWARD <tcp port>\n` on a stream to [`crate::STDIO_PORT`] asks the agent to connect to
//!   the guest's `127.0.0.1:<tcp port>` and join the two; answered `OK\n` once connected.
//! - Any refusal is `ERR <reason>\n`.
//!
//! A line is at most [`MAX_LINE`] bytes before its `\n`. Readers take it byte by byte
//! ([`LineReader`]): the peer may send payload right after the newline, and that belongs to
//! whoever gets the stream next. Parsing accepts only what encoding produces (exact keywords,
//! one space, canonical decimal ports), so there is one spelling of everything.

/// Longest handshake line, not counting its `\n`.
pub const MAX_LINE: usize = 512;

/// Longest stdio stream name.
pub const MAX_STDIO_NAME: usize = 64;

const ERR_PREFIX: &str = "ERR ";

/// Longest reason a [`Reply::Err`] carries on the wire: longer ones are cut so the reply
/// always fits in [`MAX_LINE`].
pub const MAX_REASON: usize = MAX_LINE - ERR_PREFIX.len();

/// Longest piece of a bad line quoted back in an error.
const EXCERPT: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("stream ended before the handshake line did")]
    Unterminated,
    #[error("empty handshake line")]
    Empty,
    #[error("expected CONNECT <port>, STDIO <name> or FORWARD <tcp port>, got {0:?}")]
    UnknownRequest(String),
    #[error("port {0:?} is not a decimal u32")]
    BadPort(String),
    #[error("TCP port {0:?} is not a decimal in 1-65535")]
    BadTcpPort(String),
    #[error("stdio stream name {0:?} is not 1-64 characters of [A-Za-z0-9_.-] not starting with '.'")]
    BadStdioName(String),
    #[error("expected OK, OK <port> or ERR <reason>, got {0:?}")]
    BadReply(String),
}

/// What a client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `CONNECT <port>`: a stream to guest vsock port `<port>`.
    Connect(u32),
    /// `STDIO <name>`: park this stream under `<name>` (see [`is_valid_stdio_name`]).
    Stdio(String),
    /// `FORWARD <tcp port>`: join this stream to a TCP connection to the guest's loopback.
    Forward(u16),
}

impl Request {
    /// The request line, `\n` included. A [`Request::Stdio`] with an invalid name encodes to a
    /// line the peer refuses.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Connect(port) => format!("CONNECT {port}\n"),
            // A newline in the name would end the line early and hand the peer a different name
            // (`a\nb` reads as `STDIO a`); as a space, which no valid name has, it is refused.
            Request::Stdio(name) => format!("STDIO {}\n", name.replace('\n', " ")),
            Request::Forward(port) => format!("FORWARD {port}\n"),
        }
        .into_bytes()
    }

    /// Parses one line, without its `\n`.
    pub fn parse_line(line: &[u8]) -> Result<Self, HandshakeError> {
        check_len(line)?;
        match split_keyword(line) {
            (b"CONNECT", arg) => parse_port(arg.unwrap_or_default()).map(Request::Connect),
            (b"STDIO", arg) => parse_stdio_name(arg.unwrap_or_default()).map(Request::Stdio),
            (b"FORWARD", arg) => parse_tcp_port(arg.unwrap_or_default()).map(Request::Forward),
            _ => Err(HandshakeError::UnknownRequest(excerpt(line))),
        }
    }
}

/// How the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK <port>` for a CONNECT, `OK` for a STDIO.
    Ok(Option<u32>),
    /// `ERR <reason>`; the server closes the stream after it.
    Err(String),
}

impl Reply {
    /// The reply line, `\n` included. An `Err` reason has control characters (newlines among
    /// them) replaced by spaces and is cut to [`MAX_REASON`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Ok(None) => "OK\n".to_string(),
            Reply::Ok(Some(port)) => format!("OK {port}\n"),
            Reply::Err(reason) => format!("{ERR_PREFIX}{}\n", sanitize_reason(reason)),
        }
        .into_bytes()
    }

    /// Parses one line, without its `\n`.
    pub fn parse_line(line: &[u8]) -> Result<Self, HandshakeError> {
        check_len(line)?;
        let bad = || HandshakeError::BadReply(excerpt(line));
        match split_keyword(line) {
            (b"OK", None) => Ok(Reply::Ok(None)),
            (b"OK", Some(port)) => parse_port(port).map(|p| Reply::Ok(Some(p))).map_err(|_| bad()),
            (b"ERR", Some(reason)) => parse_reason(reason).map(Reply::Err).ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

/// Collects a handshake line one byte at a time, for readers that must not consume anything
/// after the `\n` (and for non-blocking ones that get the line in pieces).
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next byte of the stream. At the `\n`, returns the line without it and starts
    /// over; past [`MAX_LINE`] bytes without one, fails (the peer is not speaking the handshake).
    pub fn push_byte(&mut self, byte: u8) -> Result<Option<Vec<u8>>, HandshakeError> {
        if byte == b'\n' {
            return Ok(Some(std::mem::take(&mut self.buf)));
        }
        if self.buf.len() >= MAX_LINE {
            return Err(HandshakeError::TooLong);
        }
        self.buf.push(byte);
        Ok(None)
    }
}

/// A stdio stream name: 1–[`MAX_STDIO_NAME`] of `[A-Za-z0-9_.-]`, not starting with `.` (the
/// agent's rule for every name it is given).
pub fn is_valid_stdio_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_STDIO_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_len(line: &[u8]) -> Result<(), HandshakeError> {
    match line.len() {
        0 => Err(HandshakeError::Empty),
        n if n > MAX_LINE => Err(HandshakeError::TooLong),
        _ => Ok(()),
    }
}

/// Splits at the first space: `(keyword, Some(rest))`, or `(line, None)` without a space.
fn split_keyword(line: &[u8]) -> (&[u8], Option<&[u8]>) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    }
}

/// Canonical decimal only: no sign, no whitespace, no leading zeros, no overflow.
fn parse_port(arg: &[u8]) -> Result<u32, HandshakeError> {
    let canonical = !arg.is_empty()
        && arg.iter().all(u8::is_ascii_digit)
        && (arg.len() == 1 || arg.first() != Some(&b'0'));
    canonical
        .then(|| std::str::from_utf8(arg).ok()?.parse().ok())
        .flatten()
        .ok_or_else(|| HandshakeError::BadPort(excerpt(arg)))
}

/// A TCP port as [`parse_port`] reads it, 1-65535.
fn parse_tcp_port(arg: &[u8]) -> Result<u16, HandshakeError> {
    let bad = || HandshakeError::BadTcpPort(excerpt(arg));
    let port = parse_port(arg).map_err(|_| bad())?;
    u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(bad)
}

fn parse_stdio_name(arg: &[u8]) -> Result<String, HandshakeError> {
    match std::str::from_utf8(arg) {
        Ok(name) if is_valid_stdio_name(name) => Ok(name.to_string()),
        _ => Err(HandshakeError::BadStdioName(excerpt(arg))),
    }
}

/// A reason is what [`sanitize_reason`] produces: non-empty UTF-8 without control characters.
fn parse_reason(arg: &[u8]) -> Option<String> {
    let reason = std::str::from_utf8(arg).ok()?;
    (!reason.is_empty() && !reason.chars().any(char::is_control)).then(|| reason.to_string())
}

fn sanitize_reason(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(MAX_REASON));
    for c in reason.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if out.len() + c.len_utf8() > MAX_REASON {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        out.push_str("refused");
    }
    out
}

fn excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoded line without its `\n` (asserting there is exactly one, at the end).
    fn body(encoded: &[u8]) -> &[u8] {
        let (last, body) = encoded.split_last().expect("non-empty");
        assert_eq!(*last, b'\n');
        assert!(!body.contains(&b'\n'), "{encoded:?}");
        body
    }

    #[test]
    fn requests_round_trip() {
        let name64 = "x".repeat(64);
        for r in [
            Request::Connect(0),
            Request::Connect(52),
            Request::Connect(u32::MAX),
            Request::Stdio("a".into()),
            Request::Stdio("stdout-123-4_a.b".into()),
            Request::Stdio(name64),
        ] {
            let line = r.encode();
            assert_eq!(Request::parse_line(body(&line)), Ok(r));
        }
        assert_eq!(Request::Connect(1024).encode(), b"CONNECT 1024\n");
        assert_eq!(Request::Stdio("s1".into()).encode(), b"STDIO s1\n");
        for port in [1, 80, 65535] {
            let r = Request::Forward(port);
            assert_eq!(Request::parse_line(body(&r.encode())), Ok(r));
        }
        assert_eq!(Request::Forward(8080).encode(), b"FORWARD 8080\n");
    }

    #[test]
    fn invalid_stdio_names_encode_to_a_refused_line() {
        // Found by the vsock_handshake fuzz target: "CONNEC\n" was read back as `STDIO CONNEC`.
        for name in ["CONNEC\n", "a\nb", "\n", "ok\nSTDIO other"] {
            let line = Request::Stdio(name.into()).encode();
            let mut r = LineReader::new();
            let first = line.iter().find_map(|&b| r.push_byte(b).expect("short line"));
            assert_eq!(first.as_deref(), Some(body(&line)), "{name:?} encodes to one line");
            assert!(
                matches!(Request::parse_line(body(&line)), Err(HandshakeError::BadStdioName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn replies_round_trip() {
        for r in
            [Reply::Ok(None), Reply::Ok(Some(0)), Reply::Ok(Some(1 << 30)), Reply::Err("no such port".into())]
        {
            let line = r.encode();
            assert_eq!(Reply::parse_line(body(&line)), Ok(r));
        }
        assert_eq!(Reply::Ok(None).encode(), b"OK\n");
        assert_eq!(Reply::Ok(Some(7)).encode(), b"OK 7\n");
        assert_eq!(Reply::Err("nope".into()).encode(), b"ERR nope\n");
    }

    #[test]
    fn malformed_requests_are_refused() {
        use HandshakeError::*;
        let long_name = format!("STDIO {}", "x".repeat(65));
        // Each line with an error of the kind it must give.
        let (unknown, port, name) =
            (&UnknownRequest(String::new()), &BadPort(String::new()), &BadStdioName(String::new()));
        let tcp = &BadTcpPort(String::new());
        let cases: &[(&[u8], &HandshakeError)] = &[
            (b"", &Empty),
            (b"HELLO", unknown),
            (b"connect 5", unknown),
            (b"Connect 5", unknown),
            (b" CONNECT 5", unknown),
            (b"CONNECT\t5", unknown),
            (b"OK 5", unknown),
            (b"CONNECT", port),
            (b"CONNECT ", port),
            (b"CONNECT -1", port),
            (b"CONNECT +1", port),
            (b"CONNECT 1 2", port),
            (b"CONNECT  5", port),
            (b"CONNECT 5 ", port),
            (b"CONNECT 5\r", port),
            (b"CONNECT 5\nCONNECT 6", port),
            (b"CONNECT 05", port),
            (b"CONNECT 0x10", port),
            (b"CONNECT 4294967296", port),
            (b"CONNECT 99999999999999999999", port),
            (b"STDIO", name),
            (b"STDIO ", name),
            (b"STDIO a b", name),
            (b"STDIO a/b", name),
            (b"STDIO ..", name),
            (b"STDIO .hidden", name),
            ("STDIO é".as_bytes(), name),
            (b"STDIO \xff", name),
            (long_name.as_bytes(), name),
            (b"FORWARD", tcp),
            (b"FORWARD 0", tcp),
            (b"FORWARD 65536", tcp),
            (b"FORWARD 080", tcp),
            (b"FORWARD -1", tcp),
            (b"FORWARD 80 81", tcp),
            (b"forward 80", unknown),
            (&[b'C'; MAX_LINE + 1], &TooLong),
        ];
        for (line, want) in cases {
            let got = Request::parse_line(line);
            let same_kind =
                got.as_ref().is_err_and(|e| std::mem::discriminant(e) == std::mem::discriminant(*want));
            assert!(same_kind, "{:?} gave {got:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn malformed_replies_are_refused() {
        for line in [
            &b""[..],
            b"OK ",
            b"OK -1",
            b"OK 1 2",
            b"OK 007",
            b"ok",
            b"ok 5",
            b"ERR",
            b"ERR ",
            b"ERROR",
            b"ERROR x",
            b"ERR\tx",
            b"ERR a\rb",
            b"ERR \xff",
            b"FAIL x",
            &[b'O'; MAX_LINE + 1],
        ] {
            assert!(Reply::parse_line(line).is_err(), "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn error_replies_have_one_spelling_and_always_parse() {
        let long = "é".repeat(MAX_LINE);
        for reason in ["", "\n", "two\nlines\r\n", "tab\there", long.as_str(), "ERROR"] {
            let line = Reply::Err(reason.into()).encode();
            assert!(line.starts_with(b"ERR ") && !line.starts_with(b"ERROR "), "{line:?}");
            let body = body(&line);
            assert!(body.len() <= MAX_LINE);
            assert!(matches!(Reply::parse_line(body), Ok(Reply::Err(_))), "{line:?}");
        }
        assert_eq!(Reply::Err("a\nb".into()).encode(), b"ERR a b\n");
        // Every codec error is itself a valid reason to send back.
        let e = Request::parse_line(b"CONNECT \n\r-1").expect_err("bad port");
        let line = Reply::Err(e.to_string()).encode();
        assert_eq!(Reply::parse_line(body(&line)), Ok(Reply::Err(e.to_string())));
    }

    #[test]
    fn line_reader_stops_at_the_newline_and_is_bounded() {
        let mut r = LineReader::new();
        let input = b"CONNECT 5\npayload";
        let mut got = None;
        for (i, &b) in input.iter().enumerate() {
            if let Some(line) = r.push_byte(b).expect("within bounds") {
                got = Some((i, line));
                break;
            }
        }
        assert_eq!(got, Some((9, b"CONNECT 5".to_vec())), "nothing after the newline is taken");
        // Without a newline nothing comes out.
        let mut r = LineReader::new();
        assert!(b"CONNECT 5".iter().all(|&b| r.push_byte(b) == Ok(None)));
        // MAX_LINE bytes are a line; one more is too long.
        let mut r = LineReader::new();
        for _ in 0..MAX_LINE {
            assert_eq!(r.push_byte(b'a'), Ok(None));
        }
        assert_eq!(r.push_byte(b'\n'), Ok(Some(vec![b'a'; MAX_LINE])));
        for _ in 0..MAX_LINE {
            assert_eq!(r.push_byte(b'a'), Ok(None));
        }
        assert_eq!(r.push_byte(b'a'), Err(HandshakeError::TooLong));
        // An empty line comes out empty, and parses as an error.
        let mut r = LineReader::new();
        let line = r.push_byte(b'\n').expect("ok").expect("a line");
        assert_eq!(Request::parse_line(&line), Err(HandshakeError::Empty));
    }

    #[test]
    fn stdio_names() {
        for good in ["a", "abc-DEF_1.2", "a.", &"x".repeat(MAX_STDIO_NAME)] {
            assert!(is_valid_stdio_name(good), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", "a\n", &"x".repeat(MAX_STDIO_NAME + 1), "é"] {
            assert!(!is_valid_stdio_name(bad), "{bad}");
        }
    }
}
