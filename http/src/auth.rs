//! Bearer-token callers and roles.
//!
//! Only the SHA-256 of each token is configured; a presented token is hashed and compared in
//! constant time against every configured hash.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Who may call what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A cardholder's client (PC, phone).
    Cardholder,
    /// The operator's staff and tools.
    Operator,
    /// A partner (franchise terminal, online mall).
    Partner,
    /// A gateway forwarding tap batches.
    Gateway,
    /// A metrics scraper (Prometheus): reads `/metrics` and nothing else.
    Metrics,
    /// An internet merchant: makes online payments and reads its own.
    Merchant,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::Cardholder,
        Role::Operator,
        Role::Partner,
        Role::Gateway,
        Role::Metrics,
        Role::Merchant,
    ];

    /// The role's name in configuration files (`role = "cardholder"`) and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Cardholder => "cardholder",
            Role::Operator => "operator",
            Role::Partner => "partner",
            Role::Gateway => "gateway",
            Role::Metrics => "metrics",
            Role::Merchant => "merchant",
        }
    }
}

/// One API token: the SHA-256 of the secret, never the secret itself.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TokenEntry {
    /// The caller's name (appears in records as who asked).
    pub name: String,
    /// The role.
    pub role: Role,
    /// Hex SHA-256 of the bearer token.
    pub sha256: String,
}

/// The authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
}

/// Why a caller was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No valid token (HTTP 401).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A valid token of the wrong role (HTTP 403).
    #[error("role {0:?} may not do this")]
    Forbidden(Role),
}

/// Exactly `N` bytes written as `2 N` hex digits (either case); `None` for anything else.
pub fn hex_array<const N: usize>(hex_digits: &str) -> Option<[u8; N]> {
    hex::decode(hex_digits).ok()?.try_into().ok()
}

/// Verifies bearer tokens.
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Vec<(String, Role, [u8; 32])>,
}

impl Auth {
    /// From configured token entries; a malformed hash is an error naming the entry.
    pub fn new(entries: &[TokenEntry]) -> Result<Auth, String> {
        let mut tokens = Vec::new();
        for e in entries {
            let h: [u8; 32] = hex_array(&e.sha256).ok_or_else(|| {
                format!(
                    "token for {:?}: sha256 must be 64 hex digits (the SHA-256 of the token)",
                    e.name
                )
            })?;
            tokens.push((e.name.clone(), e.role, h));
        }
        Ok(Auth { tokens })
    }

    /// The SHA-256 (hex) to configure for a token.
    pub fn hash_token(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    /// The caller presenting `authorization` (the header's value).
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let value = authorization.ok_or(AuthError::Unauthenticated(
            "missing Authorization: Bearer <token>",
        ))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or(AuthError::Unauthenticated(
                "Authorization must be Bearer <token>",
            ))?;
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        let mut found = None;
        for (name, role, h) in &self.tokens {
            if bool::from(h.ct_eq(&digest)) {
                found = Some(Caller {
                    name: name.clone(),
                    role: *role,
                });
            }
        }
        found.ok_or(AuthError::Unauthenticated("unknown token"))
    }

    /// Whether `/metrics` may be answered: with `public` (the operator chose to expose it,
    /// e.g. on a private network) anyone; otherwise a caller with the operator or metrics role.
    pub fn metrics_caller(
        &self,
        authorization: Option<&str>,
        public: bool,
    ) -> Result<(), AuthError> {
        if public {
            return Ok(());
        }
        self.require(authorization, &[Role::Operator, Role::Metrics])
            .map(|_| ())
    }

    /// The caller, if its role is one of `roles`.
    pub fn require(
        &self,
        authorization: Option<&str>,
        roles: &[Role],
    ) -> Result<Caller, AuthError> {
        let c = self.caller(authorization)?;
        if !roles.contains(&c.role) {
            return Err(AuthError::Forbidden(c.role));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_arrays_are_exactly_their_length() {
        assert_eq!(hex_array::<2>("0aFf"), Some([0x0a, 0xff]));
        assert_eq!(hex_array::<2>("0a"), None);
        assert_eq!(hex_array::<2>("0aff00"), None);
        assert_eq!(hex_array::<2>("0afg"), None);
        assert_eq!(hex_array::<1>("a"), None);
    }

    #[test]
    fn a_roles_name_is_its_name_in_config_files() {
        for role in Role::ALL {
            assert_eq!(serde_json::to_value(role).unwrap(), role.name());
            let back: Role = serde_json::from_value(role.name().into()).unwrap();
            assert_eq!(back, role);
        }
    }

    #[test]
    fn tokens_are_checked_by_hash_and_role() {
        let auth = Auth::new(&[TokenEntry {
            name: "ops".into(),
            role: Role::Operator,
            sha256: Auth::hash_token("secret"),
        }])
        .unwrap();
        assert!(auth.caller(None).is_err());
        assert_eq!(
            auth.require(Some("Bearer secret"), &[Role::Operator])
                .unwrap()
                .name,
            "ops"
        );
        assert_eq!(
            auth.require(Some("Bearer secret"), &[Role::Cardholder]),
            Err(AuthError::Forbidden(Role::Operator))
        );
        assert!(auth.caller(Some("Bearer secreT")).is_err());
        assert!(auth.caller(Some("Basic c2VjcmV0")).is_err());
        assert_eq!(
            auth.metrics_caller(None, false),
            Err(AuthError::Unauthenticated(
                "missing Authorization: Bearer <token>"
            ))
        );
        assert!(auth.metrics_caller(Some("Bearer secret"), false).is_ok());
        assert!(auth.metrics_caller(None, true).is_ok());
        assert!(Auth::new(&[TokenEntry {
            name: "x".into(),
            role: Role::Gateway,
            sha256: "zz".into()
        }])
        .is_err());
    }
}
