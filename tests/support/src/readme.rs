//! Commands the README shows, for tests that run them as written.

use anyhow::{Context, bail};

/// The commands of the shell code block that follows the line `marker` in `readme`: one
/// entry per command, continuation lines (`\` at the end) joined, comments and blank lines
/// dropped.
pub fn shell_commands_after(readme: &str, marker: &str) -> anyhow::Result<Vec<String>> {
    let mut lines = readme.lines().skip_while(|line| line.trim() != marker);
    lines.next().with_context(|| format!("the README has no line {marker:?}"))?;
    let fence = lines.next().unwrap_or_default().trim();
    if fence != "```sh" {
        bail!("the line after {marker:?} must open a ```sh block, not {fence:?}");
    }
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in lines {
        let trimmed = line.trim();
        if trimmed == "```" {
            if !current.is_empty() {
                bail!("the block after {marker:?} ends inside a continued command: {current}");
            }
            return Ok(commands);
        }
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(continued) => {
                current.push_str(continued.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    bail!("the ```sh block after {marker:?} is not closed")
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str =
        "intro\n<!-- run me -->\n```sh\n# a comment\nmake image IMAGE=$R/x:1\n\nhelm push a.tgz \\\n  oci://$R/charts\n```\nafter\n";

    #[test]
    fn the_block_after_the_marker_gives_one_line_per_command() {
        let commands = shell_commands_after(README, "<!-- run me -->").unwrap();
        assert_eq!(commands, ["make image IMAGE=$R/x:1", "helm push a.tgz oci://$R/charts"]);
    }

    #[test]
    fn a_missing_marker_or_block_is_an_error() {
        assert!(shell_commands_after(README, "<!-- other -->").is_err());
        assert!(shell_commands_after("<!-- run me -->\ntext\n", "<!-- run me -->").is_err());
        assert!(shell_commands_after("<!-- run me -->\n```sh\nls \\\n```\n", "<!-- run me -->").is_err());
    }
}
