//! The zip container of torch checkpoints, read in place from the mapped file: the central
//! directory (zip64 included) is checked whole before any member is used, and each member's
//! CRC-32 is checked the first time its bytes are read.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use super::tensor_file::corrupt;
use crate::limits::{exceeded, MAX_ZIP_MEMBERS};
use crate::Result;

const LOCAL_HEADER: u32 = 0x0403_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const END_OF_DIRECTORY: u32 = 0x0605_4b50;
const ZIP64_END_OF_DIRECTORY: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
/// Sizes of the fixed parts of the records.
const LOCAL_HEADER_LEN: usize = 30;
const CENTRAL_HEADER_LEN: usize = 46;
const END_LEN: usize = 22;
const ZIP64_END_LEN: usize = 56;
const ZIP64_LOCATOR_LEN: usize = 20;
/// The end record may be followed by a comment of up to this many bytes.
const MAX_COMMENT: usize = u16::MAX as usize;

/// The members of a zip archive: names and where their bytes lie in the file.
pub(crate) struct Archive {
    members: Vec<Member>,
    by_name: HashMap<String, usize>,
}

struct Member {
    name: String,
    data: Range<usize>,
    crc32: u32,
    /// Set once the CRC has been checked and found right, so that each member is hashed once
    /// however many tensors share it.
    verified: AtomicBool,
}

/// Little-endian fields read with bounds checks; `what` names the record for errors.
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn at(file: &'a [u8], pos: usize, len: usize, what: &'static str) -> Result<Self> {
        let end = pos.checked_add(len).filter(|&end| end <= file.len());
        match end {
            Some(end) => Ok(Self {
                bytes: &file[pos..end],
                pos: 0,
                what,
            }),
            None => Err(corrupt(format!(
                "truncated zip archive: the {what} at byte {pos} runs past the end of the file"
            ))),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let out = self
            .bytes
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or_else(|| corrupt(format!("zip archive: the {} is cut short", self.what)))?;
        self.pos += n;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn signature(&mut self, want: u32) -> Result<()> {
        if self.u32()? == want {
            Ok(())
        } else {
            Err(corrupt(format!(
                "zip archive: no {} signature where the directory points",
                self.what
            )))
        }
    }
}

/// A count or offset from the archive as `usize`.
fn size(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| corrupt(format!("zip archive: offset {v} is out of range")))
}

/// Where the central directory is and how many entries it has.
struct Directory {
    entries: u64,
    range: Range<usize>,
}

impl Archive {
    /// Reads the directory of the zip archive `file`, checking every member's place.
    pub(crate) fn parse(file: &[u8]) -> Result<Self> {
        let dir = directory(file)?;
        if dir.entries > MAX_ZIP_MEMBERS as u64 {
            return Err(exceeded(
                "the zip archive's member count",
                dir.entries,
                "MAX_ZIP_MEMBERS",
                MAX_ZIP_MEMBERS,
            ));
        }
        let entries = dir.entries as usize;
        // Each entry takes at least its fixed header: a count the directory cannot hold is a lie.
        if entries.saturating_mul(CENTRAL_HEADER_LEN) > dir.range.len() {
            return Err(corrupt(format!(
                "zip archive: {entries} members claimed in a {}-byte directory",
                dir.range.len()
            )));
        }
        let mut members = Vec::with_capacity(entries);
        let mut by_name = HashMap::with_capacity(entries);
        // Local header offset and data end of every member, to check for overlaps.
        let mut extents = Vec::with_capacity(entries);
        let mut pos = dir.range.start;
        for _ in 0..entries {
            let (member, local, next) = central_entry(file, pos, dir.range.end)?;
            pos = next;
            if by_name.insert(member.name.clone(), members.len()).is_some() {
                return Err(corrupt(format!(
                    "zip archive: two members are named {:?}",
                    member.name
                )));
            }
            // Stored data lies before the central directory.
            if member.data.end > dir.range.start {
                return Err(corrupt(format!(
                    "zip archive: member {:?} runs past its space (truncated file?)",
                    member.name
                )));
            }
            extents.push((local, member.data.end, members.len()));
            members.push(member);
        }
        // Sorted by where they start, each member must end before the next begins: members
        // sharing bytes are how a small file claims to hold far more than it does.
        extents.sort_unstable();
        for pair in extents.windows(2) {
            let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
            if end > start {
                return Err(corrupt(format!(
                    "zip archive: members {:?} and {:?} overlap",
                    members[a].name, members[b].name
                )));
            }
        }
        Ok(Self { members, by_name })
    }

    /// The index of the member called `name`.
    pub(crate) fn find(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Every member's name, in directory order.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| m.name.as_str())
    }

    /// The size in bytes of member `id`.
    pub(crate) fn len(&self, id: usize) -> usize {
        self.members[id].data.len()
    }

    /// The bytes of member `id` in `file` (the bytes `parse` read), its CRC-32 checked the first
    /// time unless `verify` is false.
    pub(crate) fn read<'a>(&self, file: &'a [u8], id: usize, verify: bool) -> Result<&'a [u8]> {
        let member = &self.members[id];
        let data = file.get(member.data.clone()).ok_or_else(|| {
            corrupt(format!(
                "zip archive: member {:?} lies outside the file",
                member.name
            ))
        })?;
        if verify && !member.verified.load(Ordering::Relaxed) {
            let crc = crc32fast::hash(data);
            if crc != member.crc32 {
                return Err(corrupt(format!(
                    "member {:?} is corrupt: its CRC-32 is {crc:08x}, the archive says {:08x}",
                    member.name, member.crc32
                )));
            }
            member.verified.store(true, Ordering::Relaxed);
        }
        Ok(data)
    }
}

/// Finds the end-of-directory record (zip64 when present) within the last 64 KiB + 22 bytes.
fn directory(file: &[u8]) -> Result<Directory> {
    if file.len() < END_LEN {
        return Err(corrupt("too short for a zip archive"));
    }
    let lowest = file.len().saturating_sub(END_LEN + MAX_COMMENT);
    let end = (lowest..=file.len() - END_LEN)
        .rev()
        .find(|&pos| {
            let comment = u16::from_le_bytes([file[pos + 20], file[pos + 21]]) as usize;
            file[pos..pos + 4] == END_OF_DIRECTORY.to_le_bytes()
                && pos + END_LEN + comment <= file.len()
        })
        .ok_or_else(|| corrupt("no zip end-of-directory record (truncated file?)"))?;
    let mut f = Fields::at(file, end, END_LEN, "end-of-directory record")?;
    f.signature(END_OF_DIRECTORY)?;
    let (disk, dir_disk) = (f.u16()?, f.u16()?);
    let (_, entries) = (f.u16()?, f.u16()?);
    let (dir_len, dir_start) = (f.u32()?, f.u32()?);
    if disk != 0 || dir_disk != 0 {
        return Err(corrupt("a multi-part zip archive"));
    }
    // A zip64 locator right before the end record points to the authoritative counts.
    let zip64 = end >= ZIP64_LOCATOR_LEN
        && file[end - ZIP64_LOCATOR_LEN..end - ZIP64_LOCATOR_LEN + 4]
            == ZIP64_LOCATOR.to_le_bytes();
    let (entries, dir_len, dir_start, dir_limit) = if zip64 {
        let mut loc = Fields::at(
            file,
            end - ZIP64_LOCATOR_LEN,
            ZIP64_LOCATOR_LEN,
            "zip64 locator",
        )?;
        loc.signature(ZIP64_LOCATOR)?;
        let _disk = loc.u32()?;
        let record = size(loc.u64()?)?;
        if record > end - ZIP64_LOCATOR_LEN {
            return Err(corrupt("zip64 end record lies past its locator"));
        }
        let mut r = Fields::at(file, record, ZIP64_END_LEN, "zip64 end record")?;
        r.signature(ZIP64_END_OF_DIRECTORY)?;
        let _record_len = r.u64()?;
        let _versions = r.u32()?;
        let (disk, dir_disk) = (r.u32()?, r.u32()?);
        if disk != 0 || dir_disk != 0 {
            return Err(corrupt("a multi-part zip archive"));
        }
        let (_, entries) = (r.u64()?, r.u64()?);
        (entries, r.u64()?, r.u64()?, record)
    } else {
        (entries.into(), dir_len.into(), dir_start.into(), end)
    };
    let start = size(dir_start)?;
    let end = start
        .checked_add(size(dir_len)?)
        .filter(|&e| e <= dir_limit)
        .ok_or_else(|| corrupt("the zip central directory runs past its end record"))?;
    Ok(Directory {
        entries,
        range: start..end,
    })
}

/// Reads the central-directory entry at `pos` and checks the local header it points to.
/// Returns the member, its local header's offset, and where the next entry starts.
fn central_entry(file: &[u8], pos: usize, dir_end: usize) -> Result<(Member, usize, usize)> {
    let mut f = Fields::at(
        file,
        pos,
        dir_end.saturating_sub(pos),
        "central directory entry",
    )?;
    f.signature(CENTRAL_HEADER)?;
    let _versions = f.u32()?;
    let flags = f.u16()?;
    let method = f.u16()?;
    let _time_date = f.u32()?;
    let crc32 = f.u32()?;
    let mut compressed = u64::from(f.u32()?);
    let mut uncompressed = u64::from(f.u32()?);
    let (name_len, extra_len, comment_len) = (f.u16()?, f.u16()?, f.u16()?);
    let _disk = f.u16()?;
    let _attributes = f.take(6)?;
    let mut local = u64::from(f.u32()?);
    let name_bytes = f.take(name_len.into())?;
    let extra = f.take(extra_len.into())?;
    f.take(comment_len.into())?;
    let name = String::from_utf8_lossy(name_bytes).into_owned();

    // zip64: the fields that overflowed 32 bits are in extra field 0x0001, in this order.
    let mut extra = Fields {
        bytes: extra,
        pos: 0,
        what: "zip64 extra field",
    };
    while extra.pos + 4 <= extra.bytes.len() {
        let (id, len) = (extra.u16()?, extra.u16()?);
        let mut field = Fields {
            bytes: extra.take(len.into())?,
            pos: 0,
            what: "zip64 extra field",
        };
        if id == 1 {
            for value in [&mut uncompressed, &mut compressed, &mut local] {
                if *value == u64::from(u32::MAX) {
                    *value = field.u64()?;
                }
            }
        }
    }

    if flags & 1 != 0 {
        return Err(corrupt(format!("zip member {name:?} is encrypted")));
    }
    if method != 0 {
        return Err(corrupt(format!(
            "zip member {name:?} is compressed (method {method}); torch writes stored members, \
             so this file was repacked: re-save it with torch.save or convert it to safetensors"
        )));
    }
    if compressed != uncompressed {
        return Err(corrupt(format!(
            "zip member {name:?}: stored with {compressed} bytes for {uncompressed}"
        )));
    }
    let local = size(local)?;
    let mut header = Fields::at(file, local, LOCAL_HEADER_LEN, "local header")?;
    header.signature(LOCAL_HEADER)?;
    let _version_flags = header.u32()?;
    let local_method = header.u16()?;
    let _rest = header.take(16)?;
    let (local_name_len, local_extra_len) = (header.u16()?, header.u16()?);
    let name_start = local + LOCAL_HEADER_LEN;
    let local_name = file.get(name_start..name_start + usize::from(local_name_len));
    if local_name != Some(name_bytes) || local_method != method {
        return Err(corrupt(format!(
            "zip member {name:?}: its local header does not match the directory"
        )));
    }
    let start = name_start + usize::from(local_name_len) + usize::from(local_extra_len);
    let data = start
        .checked_add(size(uncompressed)?)
        .filter(|&end| end <= file.len())
        .map(|end| start..end)
        .ok_or_else(|| {
            corrupt(format!(
                "zip member {name:?} runs past the end of the file (truncated?)"
            ))
        })?;
    let member = Member {
        name,
        data,
        crc32,
        verified: AtomicBool::new(false),
    };
    Ok((member, local, pos + f.pos))
}
