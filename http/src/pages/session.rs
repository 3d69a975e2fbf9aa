//! Sign-in for the pages: passwords (Argon2id), sessions in a cookie, CSRF tokens, and the
//! sign-in rate limits (per account and per client address).

use std::collections::HashMap;
use std::sync::Mutex;
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "tg_session";
/// The cookie that carries the sign-in form's CSRF token before there is a session.
pub const PRE_COOKIE: &str = "tg_signin";

/// Argon2id parameters of a new password hash: 19 MiB, two passes, one lane (OWASP's minimum).
const M_KIB: u32 = 19_456;
const T: u32 = 2;
const P: u32 = 1;
/// The most memory a configured hash may ask for (a mistyped configuration cannot make every
/// sign-in allocate gigabytes).
const MAX_M_KIB: u32 = 262_144;

/// A new random token: 32 bytes from the OS, hex.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// The PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`) to configure for a password.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use rand::RngCore;
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt");
    let params = argon2::Params::new(M_KIB, T, P, Some(32)).expect("valid params");
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .expect("Argon2id over a password")
        .to_string()
}

/// Whether `phc` is an Argon2id hash this server verifies (checked when the configuration is
/// read, so a typo is a configuration error and not a cardholder who can never sign in).
pub fn check_phc(phc: &str) -> Result<(), String> {
    use argon2::password_hash::PasswordHash;
    let parsed = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    if parsed.algorithm != argon2::Algorithm::Argon2id.ident() {
        return Err(format!("{} is not argon2id", parsed.algorithm));
    }
    let params = argon2::Params::try_from(&parsed).map_err(|e| format!("parameters: {e}"))?;
    if params.m_cost() > MAX_M_KIB {
        return Err(format!(
            "m={} KiB is more than {MAX_M_KIB}",
            params.m_cost()
        ));
    }
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("no salt or no hash".into());
    }
    Ok(())
}

/// Whether `password` hashes to `phc` (Argon2id recomputed with its salt and parameters,
/// compared in constant time). A hash that does not parse matches nothing.
pub fn verify_password(phc: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordHasher};
    if check_phc(phc).is_err() {
        return false;
    }
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(params), Some(want), Some(salt)) =
        (argon2::Params::try_from(&parsed), parsed.hash, parsed.salt)
    else {
        return false;
    };
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params.clone(),
    );
    match argon.hash_password_customized(password.as_bytes(), None, None, params, salt) {
        Ok(h) => h
            .hash
            .is_some_and(|got| bool::from(got.as_bytes().ct_eq(want.as_bytes()))),
        Err(_) => false,
    }
}

/// Whether two tokens are equal, in constant time.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Who a page login is: the pages a session may reach follow from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageRole {
    /// A cardholder: their own cards (`/cards`).
    Cardholder,
    /// An operator: the console (`/console`).
    Operator,
}

impl PageRole {
    /// The word the configuration and the pages use.
    pub fn name(self) -> &'static str {
        match self {
            PageRole::Cardholder => "cardholder",
            PageRole::Operator => "operator",
        }
    }
}

/// A signed-in cardholder or operator.
#[derive(Clone, Debug)]
pub struct Session {
    /// The account name (a cardholder's: the owner of their cards, their API caller name).
    pub holder: String,
    /// What the account is.
    pub role: PageRole,
    /// The CSRF token every form of this session carries.
    pub csrf: String,
    /// Last used (unix ms).
    pub touched_ms: u64,
}

/// The signed-in sessions, by the random id their cookie holds; bounded in all and per holder.
pub struct Sessions {
    idle_ms: u64,
    max_total: usize,
    max_per_holder: usize,
    by_id: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Sessions idle longer than `idle_ms` end.
    pub fn new(idle_ms: u64) -> Sessions {
        Sessions {
            idle_ms,
            max_total: 100_000,
            max_per_holder: 8,
            by_id: Mutex::new(HashMap::new()),
        }
    }

    /// A new session for `holder` in `role`: its id (the cookie's value). The account's oldest
    /// session ends when it has too many; expired ones are swept when the store is full.
    pub fn create(&self, role: PageRole, holder: &str, now_ms: u64) -> String {
        let mut m = self.by_id.lock().expect("sessions lock");
        let idle = self.idle_ms;
        if m.len() >= self.max_total {
            m.retain(|_, s| now_ms.saturating_sub(s.touched_ms) <= idle);
            if m.len() >= self.max_total {
                // Still full of live sessions: the least recently used one ends.
                if let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, s)| s.touched_ms)
                    .map(|(k, _)| k.clone())
                {
                    m.remove(&oldest);
                }
            }
        }
        let mut mine: Vec<(String, u64)> = m
            .iter()
            .filter(|(_, s)| s.holder == holder && s.role == role)
            .map(|(k, s)| (k.clone(), s.touched_ms))
            .collect();
        if mine.len() >= self.max_per_holder {
            mine.sort_by_key(|(_, t)| *t);
            for (k, _) in mine.iter().take(mine.len() + 1 - self.max_per_holder) {
                m.remove(k);
            }
        }
        let id = random_token();
        m.insert(
            id.clone(),
            Session {
                holder: holder.to_string(),
                role,
                csrf: random_token(),
                touched_ms: now_ms,
            },
        );
        id
    }

    /// The live session with this id (touched now), if any.
    pub fn get(&self, id: &str, now_ms: u64) -> Option<Session> {
        let mut m = self.by_id.lock().expect("sessions lock");
        let s = m.get_mut(id)?;
        if now_ms.saturating_sub(s.touched_ms) > self.idle_ms {
            m.remove(id);
            return None;
        }
        s.touched_ms = now_ms;
        Some(s.clone())
    }

    /// Ends a session.
    pub fn end(&self, id: &str) {
        self.by_id.lock().expect("sessions lock").remove(id);
    }
}

/// Why a sign-in attempt is not even checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Throttled {
    /// Too many failed sign-ins for this account; retry after this many seconds.
    Account(u64),
    /// Too many sign-in attempts from this address; retry after this many seconds.
    Address(u64),
}

/// Sign-in rate limits over a sliding window: at most `max_failures` failed sign-ins per
/// account, and at most `max_attempts` attempts per client address, in `window_ms`. Bounded:
/// beyond `max_keys` entries the expired ones are swept, then the oldest dropped.
pub struct SignInLimiter {
    window_ms: u64,
    max_failures: usize,
    max_attempts: usize,
    max_keys: usize,
    accounts: Mutex<HashMap<String, Vec<u64>>>,
    addresses: Mutex<HashMap<String, Vec<u64>>>,
}

impl SignInLimiter {
    /// The limits.
    pub fn new(max_failures: u32, max_attempts: u32, window_ms: u64) -> SignInLimiter {
        SignInLimiter {
            window_ms,
            max_failures: max_failures as usize,
            max_attempts: max_attempts as usize,
            max_keys: 100_000,
            accounts: Default::default(),
            addresses: Default::default(),
        }
    }

    fn retry_after(&self, times: &[u64], now_ms: u64) -> u64 {
        let oldest = times.first().copied().unwrap_or(now_ms);
        (oldest + self.window_ms)
            .saturating_sub(now_ms)
            .div_ceil(1000)
            .max(1)
    }

    fn live(times: &mut Vec<u64>, window_ms: u64, now_ms: u64) {
        times.retain(|t| now_ms.saturating_sub(*t) < window_ms);
    }

    fn bound(map: &mut HashMap<String, Vec<u64>>, max: usize, window_ms: u64, now_ms: u64) {
        if map.len() < max {
            return;
        }
        map.retain(|_, v| {
            v.last()
                .is_some_and(|t| now_ms.saturating_sub(*t) < window_ms)
        });
        while map.len() >= max {
            let Some(k) = map
                .iter()
                .min_by_key(|(_, v)| v.last().copied().unwrap_or(0))
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&k);
        }
    }

    /// Counts an attempt from `address` for `account`; refused (and then not counted against
    /// the account) when either limit is reached.
    pub fn attempt(&self, account: &str, address: &str, now_ms: u64) -> Result<(), Throttled> {
        {
            let mut a = self.accounts.lock().expect("limiter lock");
            if let Some(times) = a.get_mut(account) {
                Self::live(times, self.window_ms, now_ms);
                if times.len() >= self.max_failures {
                    return Err(Throttled::Account(self.retry_after(times, now_ms)));
                }
            }
        }
        let mut m = self.addresses.lock().expect("limiter lock");
        Self::bound(&mut m, self.max_keys, self.window_ms, now_ms);
        let times = m.entry(address.to_string()).or_default();
        Self::live(times, self.window_ms, now_ms);
        if times.len() >= self.max_attempts {
            return Err(Throttled::Address(self.retry_after(times, now_ms)));
        }
        times.push(now_ms);
        Ok(())
    }

    /// Counts a failed sign-in against `account`.
    pub fn failed(&self, account: &str, now_ms: u64) {
        let mut a = self.accounts.lock().expect("limiter lock");
        Self::bound(&mut a, self.max_keys, self.window_ms, now_ms);
        let times = a.entry(account.to_string()).or_default();
        Self::live(times, self.window_ms, now_ms);
        times.push(now_ms);
    }

    /// A successful sign-in clears the account's failures.
    pub fn succeeded(&self, account: &str) {
        self.accounts.lock().expect("limiter lock").remove(account);
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, Path=/, Secure when served over TLS;
/// `max_age_s = Some(0)` deletes it.
pub fn set_cookie(name: &str, value: &str, secure: bool, max_age_s: Option<u64>) -> String {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if secure {
        c.push_str("; Secure");
    }
    if let Some(age) = max_age_s {
        c.push_str(&format!("; Max-Age={age}"));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_hash_is_argon2id_and_verifies_only_its_password() {
        let phc = hash_password("correct horse");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(check_phc(&phc).is_ok());
        assert!(verify_password(&phc, "correct horse"));
        assert!(!verify_password(&phc, "correct horsE"));
        assert_ne!(phc, hash_password("correct horse"), "a salt per hash");
        assert!(check_phc("$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g").is_err());
        assert!(check_phc("$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g").is_err());
        assert!(check_phc("plain").is_err());
        assert!(!verify_password("plain", "plain"));
    }

    #[test]
    fn sign_in_is_limited_per_account_and_per_address() {
        let l = SignInLimiter::new(3, 5, 60_000);
        for i in 0..3 {
            assert!(l.attempt("ann", "a1", i).is_ok());
            l.failed("ann", i);
        }
        assert_eq!(l.attempt("ann", "a2", 10), Err(Throttled::Account(60)));
        assert!(l.attempt("bob", "a2", 10).is_ok(), "another account");
        assert!(l.attempt("ann", "a2", 60_001).is_ok(), "the window passed");
        // An address trying many accounts.
        for acct in ["c", "d", "e"] {
            let _ = l.attempt(acct, "a1", 100);
        }
        assert!(matches!(
            l.attempt("f", "a1", 100),
            Err(Throttled::Address(_))
        ));
        l.succeeded("ann");
        assert!(l.attempt("ann", "a3", 100).is_ok());
    }

    #[test]
    fn sessions_expire_and_are_bounded_per_holder() {
        let s = Sessions::new(1_000);
        let a = s.create(PageRole::Cardholder, "ann", 0);
        assert_eq!(s.get(&a, 500).unwrap().holder, "ann");
        assert!(s.get(&a, 1_600).is_none(), "idle too long");
        let ids: Vec<String> = (0..9)
            .map(|i| s.create(PageRole::Cardholder, "ann", 2_000 + i))
            .collect();
        let op = s.create(PageRole::Operator, "ops", 2_000);
        assert!(s.get(&ids[0], 2_100).is_none(), "the oldest of nine ended");
        assert!(s.get(&ids[8], 2_100).is_some());
        let o = s.get(&op, 2_100).expect("another account's session stays");
        assert_eq!((o.role, o.holder.as_str()), (PageRole::Operator, "ops"));
        s.end(&ids[8]);
        assert!(s.get(&ids[8], 2_100).is_none());
    }

    #[test]
    fn cookies_are_read_and_set_strictly() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("cookie", "a=1; tg_session=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        assert_eq!(
            set_cookie("x", "v", true, None),
            "x=v; Path=/; HttpOnly; SameSite=Strict; Secure"
        );
        assert!(same_token("ab", "ab") && !same_token("ab", "ac") && !same_token("a", "ab"));
    }
}
