//! Human-readable output shared by the commands: sizes, times, and the backup tree drawn as a tree.

use std::collections::HashMap;
use std::fmt::Write as _;

use chain::{Manifest, Node};

/// `1536` → `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Bytes the node's files hold on the host.
pub fn node_size(node: &Node) -> u64 {
    node.disks.iter().map(|d| d.allocated_bytes).sum()
}

/// "no node or tag X in VM Y", with near matches, for a mistyped id or tag.
pub fn not_found(manifest: &Manifest, wanted: &str) -> String {
    let near = manifest.near_matches(wanted);
    let mut msg = format!("no node or tag {wanted:?} in VM {}", manifest.vm);
    if near.is_empty() {
        msg.push_str("; `qmpbak list REPO/VM` shows the tree");
    } else {
        let _ = write!(msg, "; did you mean {}?", near.join(", "));
    }
    msg
}

/// One line describing a node (without tree drawing), appended to `out`. Written field by field: `list` draws
/// tens of thousands of these.
pub fn write_node_line(out: &mut String, node: &Node, current: bool) {
    use chrono::{Datelike as _, Timelike as _};
    let t = node.created;
    let _ = write!(
        out,
        "{}  {:<12} {:04}-{:02}-{:02} {:02}:{:02}:{:02}  {:>10}  {:<8}  lid {}..{}",
        node.id,
        node.kind,
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        bytes(node_size(node)),
        node.state,
        node.lid,
        node.tid
    );
    if let Some(tag) = &node.tag {
        let _ = write!(out, "  tag {tag}");
    }
    if current {
        out.push_str("  <- current");
    }
}

/// One line describing a node (without tree drawing).
pub fn node_line(node: &Node, current: bool) -> String {
    let mut line = String::new();
    write_node_line(&mut line, node, current);
    line
}

/// The whole tree of a manifest, one node a line, children indented under their parent in creation order.
pub fn tree(manifest: &Manifest) -> String {
    let mut children: HashMap<&str, Vec<&Node>> = HashMap::new();
    let mut roots = Vec::new();
    for node in &manifest.nodes {
        match &node.parent {
            Some(parent) => children.entry(parent.as_str()).or_default().push(node),
            None => roots.push(node),
        }
    }
    let current = manifest.current.as_ref().map(chain::NodeId::as_str);
    let mut out = String::new();
    // Iterative depth-first walk: (node, prefix for its children, its own connector).
    let mut stack: Vec<(&Node, String, &str)> = roots.iter().rev().map(|n| (*n, String::new(), "")).collect();
    while let Some((node, prefix, connector)) = stack.pop() {
        let _ = writeln!(
            out,
            "{prefix}{connector}{}",
            node_line(node, current == Some(node.id.as_str()))
        );
        let kids = children
            .get(node.id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let child_prefix = match connector {
            "├── " => format!("{prefix}│   "),
            "└── " => format!("{prefix}    "),
            _ => prefix.clone(),
        };
        for (i, kid) in kids.iter().enumerate().rev() {
            let last = i + 1 == kids.len();
            stack.push((kid, child_prefix.clone(), if last { "└── " } else { "├── " }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
    }
}
