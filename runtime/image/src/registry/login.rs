//! `Registry::login`: checking credentials the way `docker login` does, with reqwest directly (oci-client
//! only stores Basic credentials and never says whether they are good).
//!
//! GET /v2/ with Basic auth: 2xx means accepted. On 401 with a Bearer challenge, a token request to its
//! realm with Basic auth decides. Any other 401, or a 403, is a refusal.

use oci_client::errors::OciDistributionError;
use reqwest::header::WWW_AUTHENTICATE;
use reqwest::{Response, StatusCode, Url};
use tracing::debug;

use super::client::{api_host, Registry, CONNECT_TIMEOUT, READ_TIMEOUT, USER_AGENT};
use super::name::{check_registry, normalize_registry};
use super::oci_error::registry_error;
use crate::error::ImageError;

/// How much of an error response body is kept for the message.
const MAX_ERROR_BODY: usize = 4096;

impl Registry {
    /// Checks credentials against a registry (GET /v2/ with Basic auth; on a Bearer challenge, a token
    /// request to its realm with Basic auth): Ok(()) when accepted.
    pub async fn login(&self, registry: &str, user: &str, password: &str) -> Result<(), ImageError> {
        check_registry(registry)
            .map_err(|reason| ImageError::InvalidReference { reference: registry.to_owned(), reason })?;
        let registry = normalize_registry(registry);
        let fail = |e: reqwest::Error| registry_error(registry, OciDistributionError::RequestError(e));
        let refused = || ImageError::RegistryAuth {
            registry: registry.to_owned(),
            detail: format!("refused the credentials of user {user:?}"),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(USER_AGENT)
            .build()
            .map_err(fail)?;
        let plain = self.plain_http(registry);
        let scheme = if plain { "http" } else { "https" };
        let url = format!("{scheme}://{}/v2/", api_host(registry));
        debug!(%url, "checking credentials");
        let resp = http.get(&url).basic_auth(user, Some(password)).send().await.map_err(fail)?;
        match resp.status() {
            s if s.is_success() => return Ok(()),
            StatusCode::UNAUTHORIZED => {}
            StatusCode::FORBIDDEN => return Err(refused()),
            _ => return Err(server_error(registry, resp).await),
        }
        let challenge = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_bearer_challenge);
        // Basic (or no) challenge: the credentials just sent were not good enough.
        let Some(challenge) = challenge else { return Err(refused()) };
        let bad_realm = |why: &str| {
            registry_error(
                registry,
                OciDistributionError::SpecViolationError(format!("token realm {:?} {why}", challenge.realm)),
            )
        };
        let mut realm = Url::parse(&challenge.realm).map_err(|_| bad_realm("is not a URL"))?;
        // The password goes to the realm: never in the clear unless the registry itself is plain HTTP.
        match realm.scheme() {
            "https" => {}
            "http" if plain => {}
            _ => return Err(bad_realm("is not https")),
        }
        {
            let mut query = realm.query_pairs_mut();
            if let Some(service) = &challenge.service {
                query.append_pair("service", service);
            }
            query.append_pair("account", user);
        }
        debug!(realm = %challenge.realm, "requesting a token");
        let resp = http.get(realm).basic_auth(user, Some(password)).send().await.map_err(fail)?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(refused()),
            _ => Err(server_error(registry, resp).await),
        }
    }
}

/// [`ImageError::Registry`] for an unexpected status, with the start of the body.
async fn server_error(registry: &str, mut resp: Response) -> ImageError {
    let code = resp.status().as_u16();
    let url = resp.url().to_string();
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY);
    let message = String::from_utf8_lossy(&body).into_owned();
    registry_error(registry, OciDistributionError::ServerError { code, url, message })
}

/// A `Bearer realm="...",service="..."` challenge.
#[derive(Debug, PartialEq, Eq)]
struct BearerChallenge {
    realm: String,
    service: Option<String>,
}

/// Parses one WWW-Authenticate value; None unless it is a Bearer challenge with a realm.
fn parse_bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let header = header.trim_start();
    let (scheme, params) = header.split_once(|c: char| c.is_ascii_whitespace()).unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_auth_params(params);
    let get = |key: &str| params.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.clone());
    Some(BearerChallenge { realm: get("realm")?, service: get("service") })
}

/// `key=value` / `key="quoted \" value"` pairs separated by commas (RFC 7235 auth-params); stops at
/// anything else.
fn parse_auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_ascii_whitespace() || *c == ',').is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_ascii_whitespace() && !matches!(c, '=' | ',')) {
            key.push(c);
        }
        while chars.next_if(char::is_ascii_whitespace).is_some() {}
        if key.is_empty() || chars.next_if_eq(&'=').is_none() {
            return out;
        }
        while chars.next_if(char::is_ascii_whitespace).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('"') => break,
                    Some(c) => value.push(c),
                    // Unterminated quote: malformed, drop this pair.
                    None => return out,
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_ascii_whitespace() && *c != ',') {
                value.push(c);
            }
        }
        out.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges() {
        let bearer = |realm: &str, service: Option<&str>| {
            Some(BearerChallenge { realm: realm.to_owned(), service: service.map(str::to_owned) })
        };
        assert_eq!(
            parse_bearer_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a:pull""#
            ),
            bearer("https://auth.docker.io/token", Some("registry.docker.io"))
        );
        assert_eq!(
            parse_bearer_challenge(r#"bearer  Service = "s" , REALM="https://r/t?x=\"y\"" "#),
            bearer(r#"https://r/t?x="y""#, Some("s"))
        );
        assert_eq!(parse_bearer_challenge("Bearer realm=https://r/t"), bearer("https://r/t", None));
        assert_eq!(parse_bearer_challenge(r#"Basic realm="x""#), None);
        assert_eq!(parse_bearer_challenge("Bearer"), None);
        assert_eq!(parse_bearer_challenge(r#"Bearer service="s""#), None);
        assert_eq!(parse_bearer_challenge(r#"Bearer realm="unterminated"#), None);
        assert_eq!(parse_bearer_challenge(""), None);
    }
}
