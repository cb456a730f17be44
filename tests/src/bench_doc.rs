//! What the benchmarks share: docs/benchmarks.md, where each one rewrites only its own
//! `## Heading` section and leaves the others as they are, and the few figures every
//! report states (median/min/max, cores, load average).

/// (median, min, max) of `v`; the median of an even count is the mean of the middle two.
pub fn summary(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    Some((median, s[0], s[s.len() - 1]))
}

/// CPUs this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The load average over 1, 5 and 15 minutes ("0.52 0.58 0.59"), or "?" when unknown.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The 1-minute load average alone.
pub fn load_average_1m() -> String {
    load_average()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

/// Replaces the section that starts with `heading` (up to the next `## `) by `section`,
/// or appends `section` when there is none yet.
pub fn replace_section(doc: &str, heading: &str, section: &str) -> String {
    match doc.find(heading) {
        Some(start) => {
            let rest = &doc[start + heading.len()..];
            let end = rest
                .find("\n## ")
                .map(|e| start + heading.len() + e + 1)
                .unwrap_or(doc.len());
            // Always a blank line before the next section, however `section` ends.
            let rest = &doc[end..];
            let gap = if rest.is_empty() { "\n" } else { "\n\n" };
            format!(
                "{}{}{gap}{rest}",
                &doc[..start],
                section.trim_end_matches('\n')
            )
        }
        None => format!("{}\n\n{}", doc.trim_end_matches('\n'), section),
    }
}

/// Rewrites `heading`'s section of the file at `path` (created if missing).
pub fn write_section(path: &str, heading: &str, section: &str) -> std::io::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    std::fs::write(path, replace_section(&old, heading, section))
}

#[cfg(test)]
mod tests {
    use super::replace_section;

    #[test]
    fn summary_is_median_min_max() {
        assert_eq!(super::summary(&[]), None);
        assert_eq!(super::summary(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(super::summary(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
    }

    #[test]
    fn only_the_named_section_changes() {
        let doc = "# B\n\n## A\nold a\n\n## M\nold m\n\n## Z\nz\n";
        let new = replace_section(doc, "## M", "## M\nnew m\n\n");
        assert_eq!(new, "# B\n\n## A\nold a\n\n## M\nnew m\n\n## Z\nz\n");
        let tight = replace_section(doc, "## M", "## M\nnew m\n");
        assert_eq!(tight, new, "a section is always followed by a blank line");
        let appended = replace_section("# B\n", "## N", "## N\nn\n");
        assert_eq!(appended, "# B\n\n## N\nn\n");
    }
}
