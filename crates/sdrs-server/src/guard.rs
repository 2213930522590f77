//! What every request passes before a route sees it: same-origin by default (the `Host` a
//! browser was sent to, the `Origin` of the page asking, CORS for the origins the server was
//! told about), an early 413 from `Content-Length`, and errors as JSON whatever produced them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::body::{content_length, too_large};
use crate::error::ApiError;

/// The rules, from `--allowed-hosts`, `--cors-allow-origins` and `--max-body-mib`.
pub struct Guard {
    pub allowed_hosts: Vec<String>,
    pub cors_allow_origins: Vec<String>,
    pub max_body_bytes: usize,
}

impl Guard {
    /// Whether a `Host` value (name or address, maybe a port) is one this server answers to:
    /// an IP literal, a loopback name, or a name it was given. A DNS-rebinding page reaches
    /// the server under its own domain name, which this refuses.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if name.parse::<Ipv4Addr>().is_ok() || name.parse::<Ipv6Addr>().is_ok() {
            return true;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name == "localhost"
            || name.ends_with(".localhost")
            || self
                .allowed_hosts
                .iter()
                .any(|h| h == "*" || h.trim_end_matches('.').eq_ignore_ascii_case(&name))
    }

    fn origin_listed(&self, origin: &str) -> bool {
        self.cors_allow_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    /// Whether `origin` was listed by name (credentials may then be sent with it).
    fn origin_named(&self, origin: &str) -> bool {
        self.cors_allow_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// The name part of a `Host` value: `[::1]:80` → `::1`, `example.com:80` → `example.com`.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether `origin` (`scheme://host[:port]`) is the server's own, as the request's `Host`
/// names it.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    ["http://", "https://"].iter().any(|scheme| {
        origin
            .strip_prefix(scheme)
            .is_some_and(|authority| authority.eq_ignore_ascii_case(host))
    })
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn forbidden(detail: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, detail).into_response()
}

/// The middleware: Host, Origin (and `Sec-Fetch-Site`), CORS preflights, `Content-Length`.
pub async fn check(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if headers.get_all(header::HOST).iter().count() > 1 {
        return forbidden("more than one Host header".into());
    }
    let host = header_text(headers, header::HOST);
    let authority = request.uri().authority().map(|a| a.as_str());
    for name in [host, authority].into_iter().flatten() {
        if !guard.host_allowed(name) {
            return forbidden(format!(
                "this server does not answer to the name {name:?} (a guard against DNS \
                 rebinding); it answers to IP addresses and localhost, and to the names \
                 given with --allowed-hosts"
            ));
        }
    }
    if headers.contains_key(header::HOST) && host.is_none() {
        return forbidden("the Host header is not text".into());
    }

    // Browsers send Origin with every cross-origin request and with same-origin ones that
    // change state; requests without it come from other clients, or from pages that cannot
    // read the answer.
    let origin = headers.get(header::ORIGIN);
    let mut cors: Option<(HeaderValue, bool)> = None;
    if let Some(value) = origin {
        let text = value.to_str().unwrap_or("");
        if !same_origin(text, host.or(authority)) {
            if !guard.origin_listed(text) {
                return forbidden(format!(
                    "a request from the page at {text:?}, another origin; this server answers \
                     its own page only, unless --cors-allow-origins lists the origin"
                ));
            }
            cors = Some((value.clone(), guard.origin_named(text)));
        }
    } else if header_text(headers, header_name("sec-fetch-site")) == Some("cross-site") {
        let navigation = header_text(headers, header_name("sec-fetch-mode")) == Some("navigate")
            && matches!(*request.method(), Method::GET | Method::HEAD);
        if !navigation {
            return forbidden(
                "a cross-site request (Sec-Fetch-Site: cross-site); this server answers its \
                 own page only, unless --cors-allow-origins lists the origin"
                    .into(),
            );
        }
    }

    if let Some((origin, credentials)) = &cors {
        let preflight = request.method() == Method::OPTIONS
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            let allow_headers = headers
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned()
                .unwrap_or(HeaderValue::from_static("content-type, authorization"));
            let mut response = StatusCode::NO_CONTENT.into_response();
            let h = response.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
            );
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(600));
            add_cors(h, origin, *credentials);
            return response;
        }
    }

    if content_length(headers).is_some_and(|n| n > guard.max_body_bytes as u64) {
        let mut response = too_large(guard.max_body_bytes).into_response();
        if let Some((origin, credentials)) = &cors {
            add_cors(response.headers_mut(), origin, *credentials);
        }
        return response;
    }

    let mut response = next.run(request).await;
    if let Some((origin, credentials)) = &cors {
        add_cors(response.headers_mut(), origin, *credentials);
    }
    response
}

fn header_name(name: &'static str) -> header::HeaderName {
    header::HeaderName::from_static(name)
}

fn add_cors(headers: &mut HeaderMap, origin: &HeaderValue, credentials: bool) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, Retry-After"),
    );
    if credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// Turns every error answer that is not JSON yet (axum's rejections, 404s and 405s, body
/// limits) into the API's `{error, detail}` shape, keeping its status and headers. Answers
/// whose body may not have been read close the connection.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let mut response = if (status.is_client_error() || status.is_server_error())
        && !crate::body::is_json(response.headers())
    {
        let (parts, body) = response.into_parts();
        let read = axum::body::to_bytes(body, 64 << 10);
        let text = match tokio::time::timeout(Duration::from_secs(1), read).await {
            Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).trim().to_string(),
            _ => String::new(),
        };
        let detail = if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_string()
        } else {
            text
        };
        let mut fresh = ApiError::new(status, detail).into_response();
        for (name, value) in &parts.headers {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                fresh.headers_mut().append(name, value.clone());
            }
        }
        fresh
    } else {
        response
    };
    if matches!(
        status,
        StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
    ) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(hosts: &[&str]) -> Guard {
        Guard {
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            cors_allow_origins: Vec::new(),
            max_body_bytes: 1,
        }
    }

    #[test]
    fn ip_literals_and_loopback_names_are_answered_other_names_only_when_allowed() {
        let g = guard(&["studio.lan"]);
        for ok in [
            "127.0.0.1:7860",
            "127.0.0.1",
            "[::1]:7860",
            "10.0.0.5",
            "localhost:7860",
            "LOCALHOST",
            "app.localhost",
            "studio.lan:7860",
            "Studio.LAN",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example:7860",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.evil",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        assert!(guard(&["*"]).host_allowed("anything.example"));
    }

    #[test]
    fn an_origin_is_the_servers_own_when_it_names_the_same_host_and_port() {
        assert!(same_origin("http://127.0.0.1:7860", Some("127.0.0.1:7860")));
        assert!(same_origin("http://LOCALHOST:7860", Some("localhost:7860")));
        assert!(!same_origin(
            "http://127.0.0.1:7861",
            Some("127.0.0.1:7860")
        ));
        assert!(!same_origin("http://evil.example", Some("127.0.0.1:7860")));
        assert!(!same_origin("null", Some("127.0.0.1:7860")));
        assert!(!same_origin("http://127.0.0.1:7860", None));
    }
}
