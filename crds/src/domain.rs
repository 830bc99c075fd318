//! Host-name normalisation shared by policy patterns and request targets.
//!
//! A name is compared in one canonical form: IDNA (UTS #46) mapped to ASCII punycode, lower case,
//! without one trailing dot. Names whose last label is numeric are never names: they are IP
//! literals (or invalid), which `egress-gateway`'s target parser handles.

/// Why a name or pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Empty after normalisation.
    #[error("empty name")]
    Empty,
    /// IDNA processing failed.
    #[error("not a valid internationalised domain name")]
    Idna,
    /// Longer than 253 characters in ASCII form.
    #[error("name longer than 253 characters")]
    TooLong,
    /// A label is empty or longer than 63 characters.
    #[error("label {0:?} is empty or longer than 63 characters")]
    BadLabelLength(String),
    /// A label holds a character outside `a-z 0-9 - _`.
    #[error("label {0:?} holds a character outside a-z, 0-9, '-' and '_'")]
    BadLabelChar(String),
    /// The last label is numeric: this is an IP address (or an invalid one), not a name.
    #[error("numeric last label: an IP address is not a domain (use a cidr peer)")]
    NumericTld,
    /// A `*` anywhere but a leading `*.`.
    #[error("'*' is only allowed as a leading '*.' followed by a name")]
    BadWildcard,
}

/// Normalises a host name to its canonical ASCII form.
pub fn normalize_name(input: &str) -> Result<String, DomainError> {
    let trimmed = input.strip_suffix('.').unwrap_or(input);
    if trimmed.is_empty() {
        return Err(DomainError::Empty);
    }
    if trimmed.contains('*') {
        return Err(DomainError::BadWildcard);
    }
    let ascii = if trimmed.is_ascii() {
        trimmed.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(trimmed).map_err(|_| DomainError::Idna)?
    };
    // Non-ASCII input that maps to a trailing dot (e.g. an ideographic full stop) is stripped too.
    let ascii = ascii.strip_suffix('.').map(str::to_string).unwrap_or(ascii);
    if ascii.is_empty() {
        return Err(DomainError::Empty);
    }
    if ascii.len() > 253 {
        return Err(DomainError::TooLong);
    }
    let mut last = "";
    for label in ascii.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(DomainError::BadLabelLength(label.to_string()));
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
            return Err(DomainError::BadLabelChar(label.to_string()));
        }
        if label.starts_with("xn--") && idna::domain_to_unicode(label).1.is_err() {
            return Err(DomainError::Idna);
        }
        last = label;
    }
    if last_label_is_numeric(last) {
        return Err(DomainError::NumericTld);
    }
    Ok(ascii)
}

/// True when a label would make the name an IPv4 literal in WHATWG URL parsing
/// (all digits, or `0x` followed by hex digits).
pub fn last_label_is_numeric(label: &str) -> bool {
    if !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let l = label.to_ascii_lowercase();
    if let Some(hex) = l.strip_prefix("0x") {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    false
}

/// A normalised domain pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    /// Matches exactly this name.
    Exact(String),
    /// Matches names one or more labels below this name, never the name itself.
    Suffix(String),
}

impl DomainPattern {
    /// Parses `name` or `*.name`.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        match input.strip_prefix("*.") {
            Some(rest) => normalize_name(rest).map(DomainPattern::Suffix),
            None => normalize_name(input).map(DomainPattern::Exact),
        }
    }

    /// Whether a normalised host name matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            DomainPattern::Exact(n) => host == n,
            DomainPattern::Suffix(n) => {
                host.len() > n.len() + 1
                    && host.ends_with(n.as_str())
                    && host.as_bytes()[host.len() - n.len() - 1] == b'.'
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_dot_and_idna() {
        assert_eq!(normalize_name("API.Stripe.COM.").unwrap(), "api.stripe.com");
        assert_eq!(normalize_name("bücher.example").unwrap(), "xn--bcher-kva.example");
        assert_eq!(normalize_name("xn--bcher-kva.example").unwrap(), "xn--bcher-kva.example");
        assert_eq!(normalize_name("BÜCHER.example").unwrap(), "xn--bcher-kva.example");
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(normalize_name(""), Err(DomainError::Empty));
        assert_eq!(normalize_name("."), Err(DomainError::Empty));
        assert!(matches!(normalize_name("a..b"), Err(DomainError::BadLabelLength(_))));
        assert!(matches!(normalize_name("a b.com"), Err(DomainError::BadLabelChar(_))));
        assert!(matches!(normalize_name("a%2e.com"), Err(DomainError::BadLabelChar(_))));
        assert_eq!(normalize_name("10.0.0.1"), Err(DomainError::NumericTld));
        assert_eq!(normalize_name("foo.0x10"), Err(DomainError::NumericTld));
        assert_eq!(normalize_name("a.*.com"), Err(DomainError::BadWildcard));
        assert!(normalize_name(&"a".repeat(64)).is_err());
        assert!(normalize_name(&format!("{}.com", ["a"; 130].join("."))).is_err());
    }

    #[test]
    fn wildcard_never_matches_apex_or_lookalikes() {
        let p = DomainPattern::parse("*.stripe.com").unwrap();
        assert!(p.matches("api.stripe.com"));
        assert!(p.matches("a.b.stripe.com"));
        assert!(!p.matches("stripe.com"));
        assert!(!p.matches("evilstripe.com"));
        assert!(!p.matches(".stripe.com"));
        assert!(DomainPattern::parse("*.*.com").is_err());
        assert!(DomainPattern::parse("*stripe.com").is_err());
    }
}
