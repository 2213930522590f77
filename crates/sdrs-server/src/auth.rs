//! HTTP basic authentication for every route when `--api-auth` is given, and who the caller
//! is (each user sees and controls only their own jobs).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::error::ApiError;

/// The authenticated user of a request; `None` when the server has no `--api-auth`.
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<String>);

impl Caller {
    pub fn name(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_default())
    }
}

/// The `user:password` of an `Authorization: Basic …` header (the scheme in any case).
fn credentials(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Compares without stopping at the first difference, so that timing says nothing about
/// how much of a password was right.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// Lets a request through when it carries one of `users`' credentials, and records who.
pub async fn require(
    State(users): State<Arc<Vec<(String, String)>>>,
    mut request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(credentials);
    let allowed = given.filter(|(u, p)| {
        users.iter().fold(false, |ok, (user, pass)| {
            ok | (same(user, u) & same(pass, p))
        })
    });
    if let Some((user, _)) = allowed {
        request.extensions_mut().insert(Caller(Some(user)));
        return next.run(request).await;
    }
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "wrong or missing credentials").into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"sdrs\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_basic_scheme_is_read_in_any_case() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        for scheme in ["Basic", "basic", "BASIC", "bAsIc"] {
            assert_eq!(
                credentials(&format!("{scheme} {encoded}")),
                Some(("alice".into(), "pa:ss".into())),
                "{scheme}"
            );
        }
        assert_eq!(credentials(&format!("Bearer {encoded}")), None);
        assert_eq!(credentials("Basic %%%"), None);
        assert!(same("secret", "secret"));
        assert!(!same("secret", "secrex") && !same("secret", "secret2") && !same("", "x"));
    }
}
