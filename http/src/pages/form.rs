//! A `multipart/form-data` body (RFC 7578), read whole: the form of a page with a file input.
//! Strict: a body that does not follow the format is refused, never guessed at.

use super::PageError;
use axum::http::{header, HeaderMap};

/// The most parts a form may have.
const MAX_PARTS: usize = 32;

/// One field of the form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// The field's name.
    pub name: String,
    /// The file's name, for a file input (empty when none was chosen).
    pub file_name: Option<String>,
    /// What was sent.
    pub bytes: Vec<u8>,
}

impl Part {
    /// The field as text (lossy), without surrounding whitespace.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).trim().to_string()
    }
}

fn bad() -> PageError {
    PageError::Bad("The form did not arrive whole. Reload the page and send it again.".into())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The boundary of a `multipart/form-data` content type.
fn boundary(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let (kind, params) = ct.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .filter(|b| !b.is_empty() && b.len() <= 70)
}

/// The name and file name a part's `Content-Disposition: form-data` gives.
fn disposition(head: &str) -> (Option<String>, Option<String>) {
    let (mut name, mut file) = (None, None);
    for line in head.split("\r\n") {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        for param in v.split(';').map(str::trim) {
            let unquote = |s: &str| s.trim_matches('"').to_string();
            if let Some(n) = param.strip_prefix("name=") {
                name = Some(unquote(n));
            } else if let Some(f) = param.strip_prefix("filename=") {
                file = Some(unquote(f));
            }
        }
    }
    (name, file)
}

/// The parts of a `multipart/form-data` body; a 400 page for anything else.
pub fn multipart(headers: &HeaderMap, body: &[u8]) -> Result<Vec<Part>, PageError> {
    let b = boundary(headers).ok_or_else(bad)?;
    let delim = format!("--{b}").into_bytes();
    let next_delim = [b"\r\n".as_slice(), &delim].concat();
    let start = find(body, &delim).ok_or_else(bad)?;
    let mut rest = &body[start + delim.len()..];
    let mut parts = Vec::new();
    while !rest.starts_with(b"--") {
        rest = rest.strip_prefix(b"\r\n").ok_or_else(bad)?;
        let end = find(rest, b"\r\n\r\n").ok_or_else(bad)?;
        let head = std::str::from_utf8(&rest[..end]).map_err(|_| bad())?;
        let content = &rest[end + 4..];
        let len = find(content, &next_delim).ok_or_else(bad)?;
        let (name, file_name) = disposition(head);
        parts.push(Part {
            name: name.ok_or_else(bad)?,
            file_name,
            bytes: content[..len].to_vec(),
        });
        if parts.len() > MAX_PARTS {
            return Err(bad());
        }
        rest = &content[len + next_delim.len()..];
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        h
    }

    #[test]
    fn a_form_with_a_file_is_read_and_a_broken_one_refused() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\ntok\r\n--XyZ\r\nContent-Disposition: form-data; name=\"rules\"; filename=\"r.toml\"\r\nContent-Type: application/octet-stream\r\n\r\n[table]\r\nname = \"x\"\r\n--XyZ--\r\n";
        let h = headers("multipart/form-data; boundary=XyZ");
        let parts = multipart(&h, body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].text(), "tok");
        assert_eq!(parts[1].file_name.as_deref(), Some("r.toml"));
        assert_eq!(parts[1].bytes, b"[table]\r\nname = \"x\"");
        // Cut short, or not multipart at all: refused.
        assert!(multipart(&h, &body[..body.len() - 12]).is_err());
        assert!(multipart(&headers("application/x-www-form-urlencoded"), body).is_err());
        assert!(multipart(&headers("multipart/form-data; boundary=Other"), body).is_err());
    }
}
