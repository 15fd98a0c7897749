//! A minimal HTTP/1.1 GET over one connection (hyper's client connection on tokio, over
//! TLS for `https://`): no pool, no redirects. The body is handed back unread so it can be
//! streamed.

use std::time::Duration;

use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_LENGTH, ETAG, HOST, IF_NONE_MATCH, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use super::error::RegistryError;
use crate::config::AllowedHost;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to send the response head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// An `http://` or `https://` URL with a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    text: String,
    uri: Uri,
}

impl HttpUrl {
    /// Parses `http[s]://host[:port]/path`.
    pub fn parse(text: &str) -> Result<HttpUrl, RegistryError> {
        let bad = |reason: &str| RegistryError::BadSource { given: text.to_owned(), reason: reason.to_owned() };
        let uri: Uri = text.parse().map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(bad("expected an http:// or https:// URL"));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("the URL has no host"));
        }
        Ok(HttpUrl { text: text.to_owned(), uri })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn is_https(&self) -> bool {
        self.uri.scheme_str() == Some("https")
    }

    /// The host, lowercase, IPv6 addresses without their brackets.
    fn host(&self) -> String {
        let host = self.uri.host().unwrap_or_default();
        host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase()
    }

    /// The port connected to: the URL's, or the scheme's default.
    fn port(&self) -> u16 {
        self.uri.port_u16().unwrap_or(if self.is_https() { 443 } else { 80 })
    }

    fn authority(&self) -> String {
        let host = self.uri.host().unwrap_or_default();
        let default_port = if self.is_https() { 443 } else { 80 };
        format!("{host}:{}", self.uri.port_u16().unwrap_or(default_port))
    }
}

/// Refuses `url` unless `allowed` is `None` (any host) or lists its host, with its port or
/// with none. Called before any connection is made.
pub fn check_allowed_host(url: &HttpUrl, allowed: Option<&[AllowedHost]>) -> Result<(), RegistryError> {
    let Some(list) = allowed else { return Ok(()) };
    let (host, port) = (url.host(), url.port());
    if list.iter().any(|a| a.host == host && a.port.is_none_or(|p| p == port)) {
        return Ok(());
    }
    let shown: Vec<String> = list
        .iter()
        .map(|a| match (a.port, a.host.contains(':')) {
            (None, _) => a.host.clone(),
            (Some(p), true) => format!("[{}]:{p}", a.host),
            (Some(p), false) => format!("{}:{p}", a.host),
        })
        .collect();
    let allowed = if shown.is_empty() { "the list is empty".to_owned() } else { shown.join(", ") };
    Err(RegistryError::HostNotAllowed { url: url.as_str().to_owned(), host: format!("{host}:{port}"), allowed })
}

/// A plain or TLS socket.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// What a GET returned.
pub(crate) enum Reply {
    /// `304`: the copy named by `If-None-Match` is current.
    NotModified,
    /// `200`: the body, still to be read.
    Body { etag: Option<String>, length: Option<u64>, body: Incoming },
}

/// GETs `url`, sending `If-None-Match: etag` when given. Any status but 200 and 304 is an error.
pub(crate) async fn get(url: &HttpUrl, etag: Option<&str>) -> Result<Reply, RegistryError> {
    let err = |reason: String| RegistryError::Http { url: url.as_str().to_owned(), reason };
    let connect = tokio::net::TcpStream::connect(url.authority());
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| err(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| err(format!("cannot connect: {e}")))?;
    let io: Box<dyn Io> = if url.is_https() {
        Box::new(super::tls::connect(stream, url.uri.host().unwrap_or_default()).await?)
    } else {
        Box::new(stream)
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| err(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "download connection ended with an error");
        }
    });
    let path = url.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::get(path)
        .header(HOST, url.uri.authority().map_or("", |a| a.as_str()))
        .header(USER_AGENT, concat!("starling/", env!("CARGO_PKG_VERSION")));
    if let Some(tag) = etag {
        request = request.header(IF_NONE_MATCH, tag);
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(|e| err(e.to_string()))?;
    let response = tokio::time::timeout(HEAD_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| err(format!("no response within {HEAD_TIMEOUT:?}")))?
        .map_err(|e| err(e.to_string()))?;
    match response.status() {
        StatusCode::NOT_MODIFIED => Ok(Reply::NotModified),
        StatusCode::OK => {
            let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let etag = header(ETAG);
            let length = header(CONTENT_LENGTH).and_then(|v| v.parse().ok());
            Ok(Reply::Body { etag, length, body: response.into_body() })
        }
        status => Err(RegistryError::Status { url: url.as_str().to_owned(), status: status.as_u16() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_and_path() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/models/a.gguf?x=1").unwrap();
        assert_eq!(u.authority(), "127.0.0.1:8080");
        assert_eq!(u.uri.path_and_query().unwrap().as_str(), "/models/a.gguf?x=1");
        assert_eq!(HttpUrl::parse("http://example.org/a").unwrap().authority(), "example.org:80");
        assert!(HttpUrl::parse("http:///a").is_err());
        assert_eq!(HttpUrl::parse("https://example.org/a").unwrap().authority(), "example.org:443");
        assert!(HttpUrl::parse("ftp://example.org/a").is_err());
    }

    #[test]
    fn allowed_hosts_match_the_host_and_a_listed_port() {
        let list = |entries: &[(&str, Option<u16>)]| -> Vec<AllowedHost> {
            entries.iter().map(|(h, p)| AllowedHost { host: (*h).to_owned(), port: *p }).collect()
        };
        let url = HttpUrl::parse("https://Models.Example.org/m.gguf").unwrap();
        assert!(check_allowed_host(&url, None).is_ok(), "unset = any host");
        assert!(check_allowed_host(&url, Some(&list(&[("models.example.org", None)]))).is_ok());
        assert!(check_allowed_host(&url, Some(&list(&[("models.example.org", Some(443))]))).is_ok());
        let e = check_allowed_host(&url, Some(&list(&[("models.example.org", Some(8443))]))).unwrap_err();
        assert!(e.to_string().contains("host `models.example.org:443` is not in `registry.allowed_hosts`"), "{e}");
        assert!(check_allowed_host(&url, Some(&list(&[("example.org", None)]))).is_err(), "no suffix matching");
        assert!(check_allowed_host(&url, Some(&[])).is_err(), "an empty list allows no host");
        let v6 = HttpUrl::parse("http://[::1]:8080/m.gguf").unwrap();
        assert!(check_allowed_host(&v6, Some(&list(&[("::1", Some(8080))]))).is_ok());
    }
}
