//! Bearer-key authentication: which tenant a request bills to, and whether it may use the
//! admin routes. Keys are compared through their SHA-256 digests in constant time, so
//! neither the content nor the length of a configured key leaks through timing.

use sha2::{Digest, Sha256};

use super::router::Guard;
use crate::config::{ANONYMOUS, Config};
use crate::error::{ApiError, ErrorKind};
use crate::types::TenantId;

/// Who is calling: the tenant requests are billed to, and whether the admin key was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub tenant: TenantId,
    pub admin: bool,
}

/// What a route requires of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Served without a key (`server.public_routes`).
    Public,
    /// Needs a client key when auth is on.
    Client,
    /// Needs the admin key (`/admin/*`).
    Admin,
}

/// The configured keys, hashed once at startup.
pub struct Authenticator {
    keys: Vec<([u8; 32], TenantId)>,
    admin: Option<[u8; 32]>,
    public: Vec<String>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Equality of two digests that takes the same time wherever they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    pub fn new(config: &Config) -> Self {
        Authenticator {
            keys: config.auth.api_keys.iter().map(|k| (digest(&k.key), k.tenant.clone())).collect(),
            admin: config.auth.admin_key.as_deref().map(digest),
            public: config.server.public_routes.clone(),
        }
    }

    /// Whether client keys are required at all (no keys configured = auth off).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The access level of a route with `guard` at `path`: admin routes always need the
    /// admin key; client routes listed in `server.public_routes` need no key.
    pub fn access(&self, guard: Guard, path: &str) -> Access {
        match guard {
            Guard::Admin => Access::Admin,
            Guard::Public => Access::Public,
            Guard::Client if self.public.iter().any(|p| p == path) => Access::Public,
            Guard::Client => Access::Client,
        }
    }

    /// Checks the `Authorization` header value for a route of the given access level.
    pub fn authenticate(&self, access: Access, header: Option<&str>) -> Result<Caller, ApiError> {
        let presented = header.map(bearer).transpose()?.map(digest);
        let admin = matches!((&presented, &self.admin), (Some(p), Some(a)) if same(p, a));
        let tenant = presented.as_ref().and_then(|p| {
            // Scan every key so the time taken does not depend on which one matched.
            self.keys.iter().fold(None, |found, (k, t)| if same(p, k) { Some(t.clone()) } else { found })
        });
        match access {
            Access::Public => Ok(Caller { tenant: tenant.unwrap_or_else(anonymous), admin }),
            Access::Admin if admin => Ok(Caller { tenant: anonymous(), admin }),
            Access::Admin if self.admin.is_none() => {
                Err(ApiError::new(ErrorKind::NotFound, "admin routes are disabled (no admin key is configured)")
                    .with_code("admin_disabled"))
            }
            Access::Admin if tenant.is_some() => Err(ApiError::new(
                ErrorKind::Forbidden,
                "this route needs the admin key; a client API key is not allowed here",
            )
            .with_code("admin_only")),
            Access::Admin => Err(unauthorized(presented.is_some(), "the admin key")),
            Access::Client if !self.enabled() => Ok(Caller { tenant: anonymous(), admin }),
            Access::Client => match tenant {
                Some(tenant) => Ok(Caller { tenant, admin }),
                None => Err(unauthorized(presented.is_some(), "a valid API key")),
            },
        }
    }
}

fn anonymous() -> TenantId {
    TenantId::from(ANONYMOUS)
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(value: &str) -> Result<&str, ApiError> {
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::new(ErrorKind::Unauthorized, "the Authorization header must be `Bearer <key>`")
            .with_code("invalid_authorization_header"));
    }
    Ok(token)
}

fn unauthorized(presented: bool, needed: &str) -> ApiError {
    if presented {
        ApiError::new(ErrorKind::Unauthorized, format!("the key is not {needed}")).with_code("invalid_api_key")
    } else {
        ApiError::new(ErrorKind::Unauthorized, format!("this route needs {needed}: send `Authorization: Bearer <key>`"))
            .with_code("missing_api_key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ApiKey, Format};

    fn auth(keys: &[(&str, &str)], admin: Option<&str>) -> Authenticator {
        let mut config = Config::from_str("{}", Format::Json).unwrap();
        config.auth.api_keys =
            keys.iter().map(|(k, t)| ApiKey { key: (*k).to_owned(), tenant: TenantId::from(*t) }).collect();
        config.auth.admin_key = admin.map(str::to_owned);
        Authenticator::new(&config)
    }

    #[test]
    fn keys_map_to_their_tenants() {
        let a = auth(&[("k1", "alpha"), ("k2", "beta")], None);
        let c = a.authenticate(Access::Client, Some("Bearer k2")).unwrap();
        assert_eq!(c.tenant.as_str(), "beta");
        assert!(!c.admin);
        assert_eq!(a.authenticate(Access::Client, Some("bearer  k1 ")).unwrap().tenant.as_str(), "alpha");
    }

    #[test]
    fn missing_wrong_and_malformed_keys_are_401_with_distinct_codes() {
        let a = auth(&[("k1", "alpha")], None);
        let missing = a.authenticate(Access::Client, None).unwrap_err();
        assert_eq!((missing.status(), missing.code), (401, Some("missing_api_key")));
        let wrong = a.authenticate(Access::Client, Some("Bearer k1x")).unwrap_err();
        assert_eq!((wrong.status(), wrong.code), (401, Some("invalid_api_key")));
        let basic = a.authenticate(Access::Client, Some("Basic azE=")).unwrap_err();
        assert_eq!((basic.status(), basic.code), (401, Some("invalid_authorization_header")));
    }

    #[test]
    fn no_keys_means_auth_is_off_and_the_tenant_is_anonymous() {
        let a = auth(&[], None);
        assert!(!a.enabled());
        assert_eq!(a.authenticate(Access::Client, None).unwrap().tenant.as_str(), ANONYMOUS);
    }

    #[test]
    fn admin_routes_need_the_admin_key_and_client_keys_do_not_open_them() {
        let a = auth(&[("k1", "alpha")], Some("root"));
        assert_eq!(a.access(Guard::Admin, "/admin/stats"), Access::Admin);
        assert!(a.authenticate(Access::Admin, Some("Bearer root")).unwrap().admin);
        assert_eq!(a.authenticate(Access::Admin, Some("Bearer k1")).unwrap_err().status(), 403);
        assert_eq!(a.authenticate(Access::Admin, Some("Bearer nope")).unwrap_err().status(), 401);
        let disabled = auth(&[], None).authenticate(Access::Admin, Some("Bearer x")).unwrap_err();
        assert_eq!(disabled.status(), 404);
    }

    #[test]
    fn listing_an_admin_route_as_public_does_not_open_it() {
        let mut config = Config::from_str("{}", Format::Json).unwrap();
        config.server.public_routes.push("/admin/stats".into());
        config.auth.admin_key = Some("root".into());
        let a = Authenticator::new(&config);
        assert_eq!(a.access(Guard::Admin, "/admin/stats"), Access::Admin);
        assert_eq!(a.authenticate(Access::Admin, None).unwrap_err().status(), 401);
    }

    #[test]
    fn public_routes_come_from_the_config() {
        let a = auth(&[("k1", "alpha")], None);
        assert_eq!(a.access(Guard::Client, "/healthz"), Access::Public);
        assert_eq!(a.access(Guard::Client, "/v1/generate"), Access::Client);
        assert!(a.authenticate(Access::Public, None).is_ok());
    }
}
