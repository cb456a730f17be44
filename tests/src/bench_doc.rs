//! docs/benchmarks.md is shared by several benchmarks: each one rewrites only its own
//! `## Heading` section and leaves the others as they are.

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
