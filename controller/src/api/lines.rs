//! Finding the line of a field in a YAML document, so errors found after parsing (validation)
//! can point at it. A small scanner for block-style YAML, the style manifests are written in;
//! when it cannot tell (flow style, anchors), errors fall back to the document's first line.

/// The 1-based line (within `doc`) of the field at `path` (`["spec", "network", "ports[1]"]`).
pub fn field_line(doc: &str, path: &[String]) -> Option<usize> {
    let lines: Vec<&str> = doc.lines().collect();
    let (mut start, mut end, mut min_indent) = (0, lines.len(), 0usize);
    let mut found = None;
    for segment in path {
        let (key, index) = match segment.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment.as_str(), None),
        };
        let (line, indent) = find_key(&lines[start..end], key, min_indent)?;
        let line = start + line;
        found = Some(line);
        let key_block_end = block_end(&lines, line, indent);
        match index {
            None => {
                start = line + 1;
                end = key_block_end;
                min_indent = indent + 1;
            }
            Some(i) => {
                let item = nth_item(&lines, line, key_block_end, indent, i).or_else(|| inline_item(lines[line], line));
                let item = item?;
                found = Some(item);
                let item_indent = indentation(lines[item]);
                start = item;
                end = block_end(&lines, item, item_indent).max(item + 1);
                min_indent = item_indent;
            }
        }
    }
    found.map(|l| l + 1)
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim_start();
    !t.is_empty() && !t.starts_with('#')
}

/// The first line in `lines` at indentation >= `min_indent` whose key is `key` (also as the
/// first key of a list item, `- key:`), with the key's column.
fn find_key(lines: &[&str], key: &str, min_indent: usize) -> Option<(usize, usize)> {
    let mut level: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        if !is_content(line) {
            continue;
        }
        let mut indent = indentation(line);
        let mut rest = line.trim_start();
        if let Some(after) = rest.strip_prefix("- ") {
            indent += 2;
            rest = after.trim_start();
        }
        if indent < min_indent {
            break;
        }
        let level = *level.get_or_insert(indent);
        if indent != level {
            continue;
        }
        let k = rest.split(':').next().unwrap_or("").trim().trim_matches(|c| c == '"' || c == '\'');
        if k == key && rest.contains(':') {
            return Some((i, indent));
        }
    }
    None
}

fn block_end(lines: &[&str], line: usize, indent: usize) -> usize {
    (line + 1..lines.len())
        .find(|&i| is_content(lines[i]) && indentation(lines[i]) <= indent && !lines[i].trim_start().starts_with("- "))
        .or_else(|| (line + 1..lines.len()).find(|&i| is_content(lines[i]) && indentation(lines[i]) < indent))
        .unwrap_or(lines.len())
}

fn nth_item(lines: &[&str], key_line: usize, end: usize, _indent: usize, n: usize) -> Option<usize> {
    let mut seen = 0;
    let mut item_indent = None;
    for (i, line) in lines.iter().enumerate().take(end).skip(key_line + 1) {
        if !is_content(line) || !line.trim_start().starts_with('-') {
            continue;
        }
        let ind = indentation(line);
        if *item_indent.get_or_insert(ind) != ind {
            continue;
        }
        if seen == n {
            return Some(i);
        }
        seen += 1;
    }
    None
}

/// A flow list on the key's own line (`ports: ["1:1", "2:2"]`): the key's line.
fn inline_item(line: &str, at: usize) -> Option<usize> {
    line.contains('[').then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('.').map(String::from).collect()
    }

    const DOC: &str = "apiVersion: ignite.dev/v1alpha1
kind: VM
metadata:
  name: web
spec:
  image: busybox
  # a comment
  memory: 1Gi
  env:
    - name: A
      value: b
    - name: C
  network:
    ports:
      - \"8080:80\"
      - \"9090:90\"
  copyFiles: [{source: /a, destination: /b}]
";

    #[test]
    fn finds_nested_fields_and_list_items() {
        assert_eq!(field_line(DOC, &p("metadata.name")), Some(4));
        assert_eq!(field_line(DOC, &p("spec.memory")), Some(8));
        assert_eq!(field_line(DOC, &p("spec.env[1]")), Some(12));
        assert_eq!(field_line(DOC, &p("spec.env[1].name")), Some(12));
        assert_eq!(field_line(DOC, &p("spec.env[0].value")), Some(11));
        assert_eq!(field_line(DOC, &p("spec.network.ports[1]")), Some(16));
        assert_eq!(field_line(DOC, &p("spec.copyFiles[0]")), Some(17));
        assert_eq!(field_line(DOC, &p("spec.cpus")), None);
        assert_eq!(field_line(DOC, &p("name")), None, "only top-level keys at the top level");
    }
}
