//! Kubernetes name validation, as the API server applies it. Objects that a real API server
//! would refuse are skipped, so no such string ever reaches rule text.

/// RFC 1123 label: lower-case alphanumerics and '-', at most 63 chars, alphanumeric at both ends.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain as Kubernetes checks it: at most 253 chars of dot-separated parts,
/// each lower-case alphanumerics and '-' with alphanumeric ends (parts may exceed 63).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(is_dns1123_label("redis"));
        assert!(is_dns1123_label(&"a".repeat(63)));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        for bad in ["", "-a", "a-", "A", "a b", "a\"b", "a\nb", "a;b", "ü"] {
            assert!(!is_dns1123_label(bad), "{bad:?}");
        }
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain("a..b"));
        // Generated slice names of 63-char services exceed 63 chars and are valid.
        assert!(is_dns1123_subdomain(&format!("{}-x7k2p", "a".repeat(63))));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
    }
}
