//! hyper answers a request it cannot parse (a malformed request line or header, a target or
//! headers past its own limits) by itself, before the service sees it: a bare status with
//! `content-length: 0`. [`ErrorBodies`] wraps a connection's socket and gives exactly those
//! answers the API's JSON error body. The service's own 400, 414 and 431 always carry a body, so
//! an answer of one of these statuses with an empty body can only be hyper's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ApiError;

/// A connection's socket whose writes pass through, except hyper's bare parse-error answers.
pub struct ErrorBodies<T> {
    inner: T,
    /// A rewritten answer not yet fully written, and how much of it is.
    pending: Vec<u8>,
    written: usize,
}

impl<T> ErrorBodies<T> {
    pub fn new(inner: T) -> ErrorBodies<T> {
        ErrorBodies { inner, pending: Vec::new(), written: 0 }
    }
}

impl<T: AsyncWrite + Unpin> ErrorBodies<T> {
    fn flush_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ErrorBodies<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ErrorBodies<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.flush_pending(cx))?;
        if let Some(answer) = with_error_body(buf) {
            // The rewritten answer is ours to write now; hyper's bytes count as written.
            self.pending = answer;
            if let Poll::Ready(Err(e)) = self.flush_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.flush_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.flush_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `head` with the API's error body, if it is a whole bodiless 400, 414 or 431 answer.
fn with_error_body(head: &[u8]) -> Option<Vec<u8>> {
    let error = match head.get(..13)? {
        b"HTTP/1.1 400 " => ApiError::bad_request("the request is not valid HTTP/1.1", None),
        b"HTTP/1.1 414 " => ApiError::UriTooLong { limit: super::MAX_URI_BYTES },
        b"HTTP/1.1 431 " => ApiError::HeadersTooLarge { what: "more than the HTTP parser reads".into() },
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?;
    let fields = text.strip_suffix("\r\n\r\n")?;
    if fields.contains("\r\n\r\n") || !fields.split("\r\n").any(|l| l.eq_ignore_ascii_case("content-length: 0")) {
        return None;
    }
    let body = serde_json::to_vec(&error.body()).expect("API types serialize");
    let mut answer = String::with_capacity(fields.len() + 96);
    for line in fields.split("\r\n") {
        if line.eq_ignore_ascii_case("content-length: 0") {
            answer.push_str(&format!("content-length: {}\r\ncontent-type: application/json\r\n", body.len()));
        } else if !line.to_ascii_lowercase().starts_with("connection:") {
            answer.push_str(line);
            answer.push_str("\r\n");
        }
    }
    // hyper closes the connection after such an answer.
    answer.push_str("connection: close\r\n\r\n");
    let mut answer = answer.into_bytes();
    answer.extend_from_slice(&body);
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_parse_error_answers_get_a_body() {
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 00:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(with_error_body(bare).unwrap()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\ncontent-length: "), "{head}");
        assert!(head.contains("content-type: application/json") && head.ends_with("connection: close"), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], 400);
        assert!(head.contains(&format!("content-length: {}", body.len())));
        // The service's own answers, other statuses, and heads with a body pass untouched.
        assert!(with_error_body(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 50\r\n\r\n").is_none());
        assert!(with_error_body(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(with_error_body(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nextra").is_none());
        let uri = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n";
        assert!(String::from_utf8(with_error_body(uri).unwrap()).unwrap().contains("UriTooLongError"));
    }
}
