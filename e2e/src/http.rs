//! A minimal HTTP/1.1 GET client over tokio, enough for readiness probes and
//! for test pods that fetch each other through Services. It resolves names with
//! the system resolver, so `/etc/hosts` entries written by the node agent apply.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("not an http:// URL: {0}")]
    BadUrl(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("malformed HTTP response from {0}")]
    Malformed(String),
}

/// A parsed `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| HttpError::BadUrl(url.to_string()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse().map_err(|_| HttpError::BadUrl(url.to_string()))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() {
            return Err(HttpError::BadUrl(url.to_string()));
        }
        Ok(Url {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// The status code and body of a response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// GETs `url`, giving up after `timeout` for the whole exchange.
pub async fn get(url: &str, timeout: Duration) -> Result<Response, HttpError> {
    let url = Url::parse(url)?;
    let addr = format!("{}:{}", url.host, url.port);
    tokio::time::timeout(timeout, exchange(&url, &addr))
        .await
        .map_err(|_| HttpError::Timeout(addr.clone(), timeout))?
}

async fn exchange(url: &Url, addr: &str) -> Result<Response, HttpError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: matchfleet-e2e\r\nConnection: close\r\n\r\n",
        url.path, url.host
    );
    let io = |source| HttpError::Io {
        addr: addr.to_string(),
        source,
    };
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.map_err(io)?;
    parse_response(&raw).ok_or_else(|| HttpError::Malformed(addr.to_string()))
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some(Response { status, body })
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            Url::parse("http://a.b.svc:8080/x?y=1").unwrap(),
            Url {
                host: "a.b.svc".into(),
                port: 8080,
                path: "/x?y=1".into()
            }
        );
        assert_eq!(Url::parse("http://h").unwrap().port, 80);
        assert_eq!(Url::parse("http://h").unwrap().path, "/");
        assert!(Url::parse("https://h").is_err());
        assert!(Url::parse("http://h:notaport/").is_err());
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\nnope").unwrap();
        assert_eq!((plain.status, plain.body.as_str()), (503, "nope"));
        let chunked = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(chunked.body, "abcde");
        assert!(parse_response(b"garbage").is_none());
    }
}
