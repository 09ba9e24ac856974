//! Client authorisation after the TLS handshake (QEMU's `tls-authz` with `authz-simple` /
//! `authz-list`): the peer's identity is the client certificate's distinguished name as
//! GnuTLS prints it (`C=GB,O=Example,CN=client`: the certificate's order), or the PSK username.

/// Decides whether a TLS peer identity may use the server.
pub trait Authorizer: Send + Sync {
    /// Whether `identity` is allowed.
    fn is_allowed(&self, identity: &str) -> bool;

    /// [`Self::is_allowed`] for an authoriser that can fail to decide (QEMU's
    /// `qauthz_is_allowed_by_id` with a missing object): the error refuses the client too.
    fn check(&self, identity: &str) -> Result<bool, String> {
        Ok(self.is_allowed(identity))
    }
}

/// `authz-simple`: exactly one identity is allowed.
#[derive(Debug, Clone)]
pub struct AuthzSimple {
    /// The allowed identity.
    pub identity: String,
}

impl Authorizer for AuthzSimple {
    fn is_allowed(&self, identity: &str) -> bool {
        identity == self.identity
    }
}

/// How an [`AuthzRule`] matches (QEMU's `QAuthZListFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchFormat {
    /// The identity equals the pattern.
    Exact,
    /// `*` and `?` wildcards (GLib's `g_pattern_match_simple`).
    Glob,
}

/// One `authz-list` rule.
#[derive(Debug, Clone)]
pub struct AuthzRule {
    /// The pattern.
    pub pattern: String,
    /// Allow (`true`) or deny an identity it matches.
    pub allow: bool,
    /// How `pattern` matches.
    pub format: MatchFormat,
}

/// `authz-list`: the first matching rule decides; otherwise the default policy.
#[derive(Debug, Clone)]
pub struct AuthzList {
    /// The policy when no rule matches (`allow` = `true`).
    pub allow_by_default: bool,
    /// The rules, in order.
    pub rules: Vec<AuthzRule>,
}

impl Authorizer for AuthzList {
    fn is_allowed(&self, identity: &str) -> bool {
        for r in &self.rules {
            let hit = match r.format {
                MatchFormat::Exact => r.pattern == identity,
                MatchFormat::Glob => glob_match(r.pattern.as_bytes(), identity.as_bytes()),
            };
            if hit {
                return r.allow;
            }
        }
        self.allow_by_default
    }
}

/// `*` matches any run (also empty), `?` any one byte; iterative, so no deep recursion.
fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, i));
                p += 1;
            }
            Some(&c) if c == b'?' || c == s[i] => {
                p += 1;
                i += 1;
            }
            _ => match star {
                Some((sp, si)) => {
                    p = sp + 1;
                    i = si + 1;
                    star = Some((sp, si + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match(b"CN=*,O=Example", b"CN=bob,O=Example"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"a?c", b"ac"));
        assert!(!glob_match(b"CN=*,O=Example", b"CN=bob,O=Other"));
    }

    #[test]
    fn list_first_match_wins() {
        let l = AuthzList {
            allow_by_default: false,
            rules: vec![
                AuthzRule {
                    pattern: "CN=eve".into(),
                    allow: false,
                    format: MatchFormat::Exact,
                },
                AuthzRule {
                    pattern: "CN=*".into(),
                    allow: true,
                    format: MatchFormat::Glob,
                },
            ],
        };
        assert!(!l.is_allowed("CN=eve"));
        assert!(l.is_allowed("CN=bob"));
        assert!(!l.is_allowed("O=x"));
    }
}
