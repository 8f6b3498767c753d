//! A minimal HTTP/1.1 client over a plain TCP socket, enough to drive the server in tests: whole
//! responses (Content-Length or chunked) and server-sent event streams that can be abandoned
//! half-way (a client disconnecting).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("server accepts connections");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream
}

fn write_request(stream: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\nContent-Type: application/json\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
}

fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    (status, headers)
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
}

/// One chunk of a chunked body; `None` at the end.
fn read_chunk(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut size_line = String::new();
    if reader.read_line(&mut size_line).ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
    let mut data = vec![0; size + 2];
    reader.read_exact(&mut data).ok()?;
    data.truncate(size);
    (size > 0).then_some(data)
}

pub fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let mut stream = connect(port);
    write_request(&mut stream, method, path, headers, body);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let mut body = Vec::new();
    if is_chunked(&headers) {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    HttpResponse { status, headers, body }
}

pub fn get(port: u16, path: &str) -> HttpResponse {
    request(port, "GET", path, &[], b"")
}

pub fn post(port: u16, path: &str, body: &serde_json::Value) -> HttpResponse {
    request(port, "POST", path, &[], body.to_string().as_bytes())
}

/// Sends a request and returns the open connection without reading the answer; dropping it is a
/// client walking away.
pub fn send_only(port: u16, path: &str, body: &serde_json::Value) -> TcpStream {
    let mut stream = connect(port);
    write_request(&mut stream, "POST", path, &[], body.to_string().as_bytes());
    stream
}

/// A server-sent event stream being read; dropping it closes the connection.
pub struct EventStream {
    reader: BufReader<TcpStream>,
    pending: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl EventStream {
    pub fn open(port: u16, path: &str, body: &serde_json::Value) -> EventStream {
        let mut stream = connect(port);
        write_request(&mut stream, "POST", path, &[], body.to_string().as_bytes());
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader);
        EventStream { reader, pending: String::new(), status, headers }
    }

    /// The next event's data (`[DONE]` included), or `None` when the stream ends.
    pub fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let event = self.pending[..end].to_string();
                self.pending.drain(..end + 2);
                return Some(event.strip_prefix("data: ").unwrap_or(&event).to_string());
            }
            let chunk = read_chunk(&mut self.reader)?;
            self.pending.push_str(&String::from_utf8(chunk).unwrap());
        }
    }

    /// Every remaining event, up to and including `[DONE]`.
    pub fn collect(mut self) -> Vec<String> {
        let mut events = Vec::new();
        while let Some(e) = self.next_event() {
            let done = e == "[DONE]";
            events.push(e);
            if done {
                break;
            }
        }
        events
    }
}
