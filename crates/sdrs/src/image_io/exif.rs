//! The infotext of a JPEG: an EXIF `UserComment`, laid out byte for byte as A1111 writes it
//! (piexif's `dump` of `{"Exif": {UserComment: UserComment.dump(text, "unicode")}}`), and read
//! back from any writer's EXIF by walking two IFDs with every offset checked.

/// EXIF's pointer from IFD0 to the Exif IFD.
const EXIF_IFD_POINTER: u16 = 0x8769;
/// The Exif IFD's `UserComment` tag.
const USER_COMMENT: u16 = 0x9286;
/// TIFF field types: LONG (u32) and UNDEFINED (bytes).
const LONG: u16 = 4;
const UNDEFINED: u16 = 7;
/// `UserComment`'s 8-byte character-code prefixes.
const UNICODE_PREFIX: &[u8; 8] = b"UNICODE\0";
const ASCII_PREFIX: &[u8; 8] = b"ASCII\0\0\0";

/// The EXIF (TIFF) block, without the JPEG's `Exif\0\0` header, that carries `text` as its
/// `UserComment`: big-endian, IFD0 holding only the Exif IFD pointer, the Exif IFD holding
/// only the comment, as UTF-16BE after the `UNICODE` prefix (piexif's layout).
pub fn user_comment_exif(text: &str) -> Vec<u8> {
    let comment: Vec<u8> = UNICODE_PREFIX
        .iter()
        .copied()
        .chain(text.encode_utf16().flat_map(u16::to_be_bytes))
        .collect();
    // Header (8), IFD0 with one entry and a next-IFD link (2 + 12 + 4), then the Exif IFD
    // with one entry (2 + 12, piexif writes no link after it), then the comment.
    let exif_ifd: u32 = 8 + 2 + 12 + 4;
    let data = exif_ifd + 2 + 12;
    let mut out = Vec::with_capacity(data as usize + comment.len());
    out.extend_from_slice(b"MM\0\x2a");
    out.extend_from_slice(&8u32.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    entry(&mut out, EXIF_IFD_POINTER, LONG, 1, exif_ifd);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    // A comment over u32::MAX bytes cannot be in a JPEG segment anyway; the count saturates.
    let count = u32::try_from(comment.len()).unwrap_or(u32::MAX);
    entry(&mut out, USER_COMMENT, UNDEFINED, count, data);
    out.extend_from_slice(&comment);
    out
}

fn entry(out: &mut Vec<u8>, tag: u16, kind: u16, count: u32, value: u32) {
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&value.to_be_bytes());
}

/// The `UserComment` of an EXIF (TIFF) block, decoded as A1111 does: `UNICODE` as UTF-16BE
/// (piexif's reading), `ASCII` as ASCII, anything else as UTF-8 with bad bytes dropped.
/// `None` when the block is malformed or has no comment.
pub fn read_user_comment(tiff: &[u8]) -> Option<String> {
    let order = match tiff.get(..2)? {
        b"MM" => Order::Big,
        b"II" => Order::Little,
        _ => return None,
    };
    let ifd0 = order.u32(tiff, 4)? as usize;
    let exif_ifd = pointer(tiff, order, ifd0, EXIF_IFD_POINTER)? as usize;
    let (kind, count, at) = field(tiff, order, exif_ifd, USER_COMMENT)?;
    if kind != UNDEFINED {
        return None;
    }
    // Values of up to 4 bytes sit in the entry itself.
    let start = if count <= 4 {
        at
    } else {
        order.u32(tiff, at)? as usize
    };
    let bytes = tiff.get(start..start.checked_add(count as usize)?)?;
    let (prefix, body) = (bytes.get(..8)?, &bytes[8..]);
    Some(if prefix == UNICODE_PREFIX {
        let units: Vec<u16> = body
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
            .collect();
        String::from_utf16_lossy(&units)
    } else if prefix == ASCII_PREFIX {
        body.iter()
            .filter(|b| b.is_ascii())
            .map(|&b| b as char)
            .collect()
    } else {
        String::from_utf8_lossy(body).replace('\u{FFFD}', "")
    })
}

#[derive(Clone, Copy)]
enum Order {
    Big,
    Little,
}

impl Order {
    fn u16(self, b: &[u8], at: usize) -> Option<u16> {
        let s: [u8; 2] = b.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(match self {
            Order::Big => u16::from_be_bytes(s),
            Order::Little => u16::from_le_bytes(s),
        })
    }

    fn u32(self, b: &[u8], at: usize) -> Option<u32> {
        let s: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(match self {
            Order::Big => u32::from_be_bytes(s),
            Order::Little => u32::from_le_bytes(s),
        })
    }
}

/// The IFD at `ifd`'s entry for `tag`: `(type, count, where its value field is)`. The entry
/// count is bounded by the block's length before the walk.
fn field(tiff: &[u8], order: Order, ifd: usize, tag: u16) -> Option<(u16, u32, usize)> {
    let entries = order.u16(tiff, ifd)? as usize;
    if entries.checked_mul(12)? > tiff.len() {
        return None;
    }
    (0..entries).find_map(|i| {
        let at = ifd + 2 + 12 * i;
        (order.u16(tiff, at)? == tag).then_some(())?;
        Some((order.u16(tiff, at + 2)?, order.u32(tiff, at + 4)?, at + 8))
    })
}

/// The single LONG value of `tag` in the IFD at `ifd` (an offset to another IFD).
fn pointer(tiff: &[u8], order: Order, ifd: usize, tag: u16) -> Option<u32> {
    let (kind, count, at) = field(tiff, order, ifd, tag)?;
    (kind == LONG && count == 1).then_some(())?;
    order.u32(tiff, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `piexif.dump({"Exif": {piexif.ExifIFD.UserComment:
    /// piexif.helper.UserComment.dump(text, encoding="unicode")}})` with piexif 1.1.3, less its
    /// leading `Exif\0\0`.
    const PIEXIF: &[(&str, &str)] = &[
        (
            "a cat\nSteps: 20, Seed: 1",
            "4d4d002a00000008000187690004000000010000001a000000000001928600070000003800000028\
             554e49434f44450000610020006300610074000a00530074006500700073003a0020003200300\
             02c00200053006500650064003a00200031",
        ),
        (
            "é ☃",
            "4d4d002a00000008000187690004000000010000001a000000000001928600070000000e00000028\
             554e49434f44450000e900202603",
        ),
    ];

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn written_as_piexif_writes_it_and_read_back() {
        for (text, bytes) in PIEXIF {
            let want = hex(bytes);
            assert_eq!(user_comment_exif(text), want, "{text}");
            assert_eq!(read_user_comment(&want).as_deref(), Some(*text));
        }
    }

    #[test]
    fn little_endian_ascii_and_short_values_are_read() {
        // II order, IFD0 at 8 → Exif IFD at 26 → a 12-byte ASCII comment at 40.
        let mut tiff = b"II\x2a\0\x08\0\0\0".to_vec();
        tiff.extend_from_slice(&[1, 0, 0x69, 0x87, 4, 0, 1, 0, 0, 0, 26, 0, 0, 0, 0, 0, 0, 0]);
        tiff.extend_from_slice(&[1, 0, 0x86, 0x92, 7, 0, 12, 0, 0, 0, 40, 0, 0, 0]);
        tiff.extend_from_slice(b"ASCII\0\0\0cat!");
        assert_eq!(read_user_comment(&tiff).as_deref(), Some("cat!"));
    }

    #[test]
    fn malformed_blocks_are_none_not_panics() {
        let good = user_comment_exif("a cat");
        for cut in 0..good.len() {
            assert_eq!(read_user_comment(&good[..cut]), None, "cut at {cut}");
        }
        let mut huge_count = good.clone();
        huge_count[32..36].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut bad_offset = good.clone();
        bad_offset[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut entries = good;
        entries[8..10].copy_from_slice(&0xffffu16.to_be_bytes());
        for bad in [huge_count, bad_offset, entries] {
            assert_eq!(read_user_comment(&bad), None);
        }
    }
}
