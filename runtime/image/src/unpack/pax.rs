//! An entry's PAX records, framed by their length prefixes as POSIX says.
//!
//! The tar crate (0.4.46) splits a PAX header on newlines instead (tar-rs issues #428, #452), so a value
//! holding a newline byte, as binary `security.capability` values can, comes out as errors, and a crafted
//! one as records that are not there (say a `linkpath`) while Go's archive/tar, hence docker, reads the
//! real ones. So the records are framed here from a copy of the raw headers, and an entry is refused when
//! the path, link target, size, uid or gid the tar crate went by differs from what the records say.

use std::io::Read;

use super::stream::HeaderTap;
use super::Layer;
use crate::error::ImageError;

const BLOCK: usize = 512;
const AMBIGUOUS: &str = "PAX records that tar readers disagree on (a value holds a newline)";

pub(super) struct Record {
    pub(super) key: Vec<u8>,
    pub(super) value: Vec<u8>,
}

/// The entry's PAX records (none if it has no PAX header), checked against what the tar crate made of
/// them. `tap` must hold the headers read for this entry.
pub(super) fn entry_records<R: Read>(
    layer: &Layer,
    name: &str,
    entry: &mut tar::Entry<R>,
    tap: &HeaderTap,
) -> Result<Vec<Record>, ImageError> {
    use tar::EntryType as T;
    // Extension headers the tar reader hands out as entries (PAX global headers, say) are skipped
    // unapplied, and for them `pax_extensions` would read their whole data into memory.
    if matches!(entry.header().entry_type(), T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink)
    {
        return Ok(Vec::new());
    }
    let Some(theirs) = entry.pax_extensions().map_err(layer.failed(name))? else { return Ok(Vec::new()) };
    let theirs: Vec<(Vec<u8>, Vec<u8>)> =
        theirs.flatten().map(|r| (r.key_bytes().to_vec(), r.value_bytes().to_vec())).collect();
    let headers = tap.headers();
    let body = local_body(&headers).ok_or_else(|| layer.refuse(name, "PAX header not found"))?;
    let records = parse(body).map_err(|reason| layer.refuse(name, reason))?;

    let invented = theirs.iter().any(|(k, v)| !records.iter().any(|r| r.key == *k && r.value == *v));
    if invented {
        return Err(layer.refuse(name, AMBIGUOUS));
    }
    for record in &records {
        let agrees = match record.key.as_slice() {
            b"path" => record.value == *entry.path_bytes(),
            b"linkpath" => entry.link_name_bytes().is_some_and(|link| record.value == *link),
            b"uid" => parse_decimal(&record.value) == entry.header().uid().ok(),
            b"gid" => parse_decimal(&record.value) == entry.header().gid().ok(),
            // Sparse entries report their expanded size.
            b"size" if !entry.header().entry_type().is_gnu_sparse() => {
                parse_decimal(&record.value) == Some(entry.size())
            }
            _ => true,
        };
        if !agrees {
            return Err(layer.refuse(name, AMBIGUOUS));
        }
    }
    Ok(records)
}

/// The body of the PAX header (typeflag 'x') among the headers read for one entry, which start at a
/// block boundary: extension headers (PAX, GNU long name/link) with their bodies, then the entry's own.
fn local_body(headers: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    let mut body = None;
    while let Some(block) = headers.get(at..at + BLOCK) {
        let header = tar::Header::from_byte_slice(block);
        let size = usize::try_from(header.entry_size().ok()?).ok()?;
        let data = at + BLOCK;
        match header.entry_type() {
            tar::EntryType::XHeader => body = Some(headers.get(data..data.checked_add(size)?)?),
            tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {}
            _ => return body,
        }
        at = data.checked_add(size.div_ceil(BLOCK) * BLOCK)?;
    }
    None
}

/// Splits a PAX header body into `LEN KEY=VALUE\n` records, LEN counting the whole record.
fn parse(mut body: &[u8]) -> Result<Vec<Record>, &'static str> {
    const MALFORMED: &str = "malformed PAX record";
    let mut records = Vec::new();
    // Some writers pad the body with NULs.
    while !body.iter().all(|&b| b == 0) {
        let space = body.iter().position(|&b| b == b' ').ok_or(MALFORMED)?;
        let len = parse_decimal(&body[..space]).and_then(|n| usize::try_from(n).ok()).ok_or(MALFORMED)?;
        if len <= space + 1 || len > body.len() || body[len - 1] != b'\n' {
            return Err(MALFORMED);
        }
        let record = &body[space + 1..len - 1];
        let equals = record.iter().position(|&b| b == b'=').ok_or(MALFORMED)?;
        records.push(Record { key: record[..equals].to_vec(), value: record[equals + 1..].to_vec() });
        body = &body[len..];
    }
    Ok(records)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_by_length() {
        let body = b"29 SCHILY.xattr.user.a=1\n2\n3\n18 path=some/file\n\0\0";
        let records = parse(body).expect("parse");
        let pairs: Vec<(&[u8], &[u8])> =
            records.iter().map(|r| (r.key.as_slice(), r.value.as_slice())).collect();
        assert_eq!(pairs, [(&b"SCHILY.xattr.user.a"[..], &b"1\n2\n3"[..]), (b"path", b"some/file")]);
        for bad in [&b"5 a=b\n"[..], b"99 a=b\n", b"x a=b\n", b"+7 a=b\n", b"6 ab\nX", b"5 ab\n"] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
