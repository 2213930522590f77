//! Layer counts from numbered tensor names (`…input_blocks.3.…`), taken from the numbers
//! actually present: distinct, running from 0 without a gap, and bounded by a named limit.
//! Never from the largest number alone, which would let one name such as
//! `input_blocks.100000000000.0.weight` ask for 10^11 layers.

use std::collections::BTreeSet;

use crate::limits::exceeded;
use crate::{Error, Result};

/// A named limit: its name in `crate::limits` and its value.
pub(crate) type Limit = (&'static str, usize);

/// How many numbered children `{prefix}N.…` (or `{prefix}N` at the end of a name) `names`
/// hold; `what` names them in errors. Names under `prefix` that do not continue with a number
/// are not children.
pub(crate) fn count<'n>(
    names: impl Iterator<Item = &'n str>,
    prefix: &str,
    what: &str,
    (limit_name, limit): Limit,
) -> Result<usize> {
    let mut present = BTreeSet::new();
    for name in names {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let digits = rest.split('.').next().unwrap_or_default();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        match digits.parse::<usize>() {
            Ok(n) if n < limit => {
                present.insert(n);
            }
            _ => {
                let implied = digits.parse::<u128>().map_or_else(
                    |_| format!("a {}-digit number", digits.len()),
                    |n| (n + 1).to_string(),
                );
                return Err(exceeded(
                    format!("the count of {what} that tensor {name} implies"),
                    implied,
                    limit_name,
                    limit,
                ));
            }
        }
    }
    let Some(&last) = present.last() else {
        return Ok(0);
    };
    if last + 1 != present.len() {
        // Some number below `last` is missing; all are below `limit`, so this loop is bounded.
        let missing = (0..last).find(|n| !present.contains(n)).unwrap_or(last);
        return Err(Error::InvalidConfig(format!(
            "{what}: tensors {prefix}0 to {prefix}{last} have a gap, no {prefix}{missing}"
        )));
    }
    Ok(present.len())
}

/// How many of `exists(0)`, `exists(1)`, ... hold before the first that does not, refusing
/// more than the limit.
pub(crate) fn consecutive(
    what: &str,
    (limit_name, limit): Limit,
    exists: impl Fn(usize) -> bool,
) -> Result<usize> {
    let n = (0..=limit).take_while(|&i| exists(i)).count();
    if n > limit {
        return Err(exceeded(
            format!("the count of {what}"),
            format!("more than {limit}"),
            limit_name,
            limit,
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = ("MAX_TEST", 8);

    fn n(names: &[&str]) -> Result<usize> {
        count(names.iter().copied(), "blocks.", "test blocks", LIMIT)
    }

    #[test]
    fn counts_distinct_numbers_from_zero() {
        assert_eq!(
            n(&["blocks.0.w", "blocks.0.b", "blocks.1.w", "other.5"]).unwrap(),
            2
        );
        assert_eq!(n(&["blocks.norm.w", "x"]).unwrap(), 0);
        assert_eq!(n(&["blocks.0", "blocks.1"]).unwrap(), 2);
    }

    #[test]
    fn a_gap_or_a_huge_number_is_an_error_naming_it() {
        let gap = n(&["blocks.0.w", "blocks.2.w"]).unwrap_err().to_string();
        assert!(gap.contains("no blocks.1"), "{gap}");
        let huge = n(&["blocks.0.w", "blocks.100000000000.w"])
            .unwrap_err()
            .to_string();
        assert!(
            huge.contains("100000000001") && huge.contains("MAX_TEST"),
            "{huge}"
        );
        let absurd = n(&[&format!("blocks.{}.w", "9".repeat(60))])
            .unwrap_err()
            .to_string();
        assert!(absurd.contains("60-digit"), "{absurd}");
    }

    #[test]
    fn consecutive_stops_at_the_limit() {
        assert_eq!(consecutive("x", LIMIT, |i| i < 3).unwrap(), 3);
        let err = consecutive("x", LIMIT, |_| true).unwrap_err().to_string();
        assert!(err.contains("MAX_TEST"), "{err}");
    }
}
