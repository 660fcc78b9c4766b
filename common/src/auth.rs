//! The API key: `--api-key` / `--api-key-file` on every binary, checked as
//! `Authorization: Bearer <key>` in constant time — by the gateway on HTTP (its own middleware,
//! with the error shapes of its routes) and by the gRPC services on every call but health checks
//! ([`crate::grpc::GuardLayer`]). The gateway sends its key on every call
//! to the services, so one key configured on all three protects the whole worker.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use http::HeaderValue;
use subtle::ConstantTimeEq;

/// Longest key accepted (a key is a header value; proxies limit those).
pub const MAX_KEY_BYTES: usize = 4096;

/// The key flags, flattened into each binary's serve flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ApiKeyArgs {
    /// Require `Authorization: Bearer <KEY>` on every request (the gateway: every route but
    /// `--public-paths`; the gRPC services: every call but health checks). Prefer
    /// `--api-key-file` or the variable: a flag's value shows in `ps`.
    #[arg(long, env = "LLORCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<KeyText>,
    /// A file whose first line is the key (e.g. a mounted secret).
    #[arg(long, env = "LLORCH_API_KEY_FILE", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
}

impl ApiKeyArgs {
    /// The key to require: `--api-key`, else the first line of `--api-key-file`, else none.
    pub fn load(&self) -> anyhow::Result<Option<ApiKey>> {
        // Checked here, not by clap, whose error would print the value.
        if let Some(key) = &self.api_key {
            return ApiKey::parse(&key.0).map(Some).map_err(|e| anyhow::anyhow!("--api-key: {e}"));
        }
        let Some(path) = &self.api_key_file else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", path.display()))?;
        let line = text.lines().next().unwrap_or_default();
        ApiKey::parse(line)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", path.display()))
    }
}

/// The `--api-key` value as given, unchecked ([`ApiKeyArgs::load`] checks it, without
/// printing it). Its `Debug` never shows it.
#[derive(Clone)]
pub struct KeyText(pub String);

impl std::str::FromStr for KeyText {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for KeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyText(<redacted>)")
    }
}

/// A key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// A key: 1 to [`MAX_KEY_BYTES`] visible ASCII characters (what a header value can carry
    /// unchanged), surrounding spaces removed.
    pub fn parse(key: &str) -> Result<Self, String> {
        let key = key.trim();
        if key.is_empty() {
            return Err("the API key is empty".to_owned());
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(format!("the API key is {} bytes; at most {MAX_KEY_BYTES}", key.len()));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the API key must be visible ASCII characters, without spaces".to_owned());
        }
        Ok(Self(key.into()))
    }

    /// Whether `authorization` (the header's value) is `Bearer <this key>`. The key is compared
    /// in constant time (a wrong key's length is all its timing can tell).
    pub fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(value) = authorization else { return false };
        let bytes = value.as_bytes();
        let Some(scheme) = bytes.get(..7) else { return false };
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return false;
        }
        bytes[7..].trim_ascii().ct_eq(self.0.as_bytes()).into()
    }

    /// `Bearer <key>`, marked sensitive (not logged by `http`'s `Debug`), for outgoing calls.
    pub fn bearer(&self) -> HeaderValue {
        // Visible ASCII only (checked in `parse`): always a valid header value.
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        v.set_sensitive(true);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn only_bearer_and_the_exact_key_are_accepted() {
        let key = ApiKey::parse(" s3cret-key\n").unwrap();
        assert!(key.accepts(Some(&header("Bearer s3cret-key"))));
        assert!(key.accepts(Some(&header("bearer s3cret-key"))));
        for wrong in [
            "Bearer s3cret-kex",
            "Bearer s3cret-key2",
            "Bearer ",
            "Basic s3cret-key",
            "s3cret-key",
            "",
        ] {
            assert!(!key.accepts(Some(&header(wrong))), "{wrong:?}");
        }
        assert!(!key.accepts(None));
        assert_eq!(key.bearer(), "Bearer s3cret-key");
        assert!(key.bearer().is_sensitive());
    }

    #[test]
    fn bad_keys_are_refused_and_never_shown() {
        for bad in ["", "   ", "two words", "tab\there", "é"] {
            assert!(ApiKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ApiKey::parse(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert_eq!(format!("{:?}", ApiKey::parse("visible").unwrap()), "ApiKey(<redacted>)");
    }

    #[test]
    fn a_bad_key_flag_is_refused_without_printing_it() {
        let args = ApiKeyArgs { api_key: Some(KeyText("sec ret".into())), api_key_file: None };
        let err = args.load().unwrap_err().to_string();
        assert!(err.contains("--api-key") && !err.contains("sec ret"), "{err}");
        assert!(!format!("{args:?}").contains("sec"), "{args:?}");
    }

    #[test]
    fn a_key_file_gives_its_first_line() {
        let dir = std::env::temp_dir().join(format!("llorch-key-{}", std::process::id()));
        std::fs::write(&dir, "from-file\nignored\n").unwrap();
        let args = ApiKeyArgs { api_key: None, api_key_file: Some(dir.clone()) };
        assert_eq!(args.load().unwrap(), Some(ApiKey::parse("from-file").unwrap()));
        std::fs::write(&dir, "\n").unwrap();
        assert!(args.load().unwrap_err().to_string().contains("empty"));
        std::fs::remove_file(&dir).unwrap();
        let missing = ApiKeyArgs { api_key: None, api_key_file: Some(dir) };
        assert!(missing.load().unwrap_err().to_string().contains("--api-key-file"));
    }
}
