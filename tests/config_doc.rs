//! docs/configuration.md against the configuration structs: every key the file format takes
//! has a row in its table's key table, and every row names a key the format takes, so that a
//! key can never be added (or removed) without the reference saying so.
//!
//! The keys come from the parser itself, not from a list kept here: every table is
//! `deny_unknown_fields`, so a snippet with an unknown key in a table is refused with serde's
//! "unknown field `x`, expected one of `a`, `b`, …", which names every key of that table.
//! Tables inside tables are found the same way (a key whose `[KEY]` or `[[KEY]]` header takes
//! an unknown key of its own is a table), so a new table is checked too.

use tidegate::config::Config;
use tidegate::error::ConfigError;

/// A key no table has.
const PROBE: &str = "zz_probe_key";

/// A table of the file format: how to open it in TOML, and its keys.
#[derive(Debug)]
struct Table {
    /// The section heading naming it in the reference: `Top level`, `` `[tls]` ``,
    /// `` `[[pool.backend]]` ``.
    heading: String,
    /// Its dotted path (empty at the top).
    path: String,
    /// The TOML headers that open it (`[[pool]]\n[pool.session]\n`).
    prefix: String,
    /// Every key it takes.
    keys: Vec<String>,
}

/// The keys serde expected where it found [`PROBE`] after `prefix`, or `None` when `prefix`
/// does not open a table (the probe is refused for another reason).
fn keys_after(prefix: &str) -> Option<Vec<String>> {
    let text = format!("{prefix}{PROBE} = 1\n");
    let message = match Config::from_toml(&text, "probe.toml") {
        Err(ConfigError::Invalid { message, .. }) => message,
        other => panic!("{text:?}: expected a refusal, got {other:?}"),
    };
    let expected = message
        .strip_prefix(&format!("unknown field `{PROBE}`, "))?
        .trim();
    let keys: Vec<String> = if expected == "there are no fields" {
        Vec::new()
    } else {
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    assert!(
        !keys.is_empty(),
        "{text:?}: no keys in serde's message {message:?}"
    );
    Some(keys)
}

/// Every table of the format, from the top level down.
fn tables() -> Vec<Table> {
    let top = Table {
        heading: "Top level".into(),
        path: String::new(),
        prefix: String::new(),
        keys: keys_after("").expect("the top level takes keys"),
    };
    let mut tables = vec![top];
    let mut next = 0;
    // Bounded: the format nests a few levels, each table is visited once.
    while next < tables.len() && tables.len() < 100 {
        let (path, prefix, keys) = {
            let t = &tables[next];
            (t.path.clone(), t.prefix.clone(), t.keys.clone())
        };
        for key in keys {
            let child = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            for header in [format!("[{child}]"), format!("[[{child}]]")] {
                let prefix = format!("{prefix}{header}\n");
                if let Some(keys) = keys_after(&prefix) {
                    tables.push(Table {
                        heading: format!("`{header}`"),
                        path: child.clone(),
                        prefix,
                        keys,
                    });
                    break;
                }
            }
        }
        next += 1;
    }
    tables
}

/// The text of the `### HEADING` section of the reference, up to the next heading.
fn section<'a>(page: &'a str, heading: &str) -> Option<&'a str> {
    let start = page.find(&format!("\n### {heading}\n"))? + heading.len() + 6;
    let rest = &page[start..];
    let end = rest
        .find("\n### ")
        .into_iter()
        .chain(rest.find("\n## "))
        .min()
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The keys of the section's key table: the first `| key | …` table, one `` `key` `` a row.
fn documented_keys(section: &str) -> Vec<String> {
    section
        .lines()
        .skip_while(|l| !l.starts_with("| key |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|row| {
            let cell = row.trim_start_matches('|').split('|').next()?.trim();
            Some(cell.strip_prefix('`')?.strip_suffix('`')?.to_string())
        })
        .collect()
}

fn reference() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .expect("docs/configuration.md")
}

#[test]
fn every_key_of_every_table_is_in_the_reference_and_every_row_is_a_key() {
    let page = reference();
    let tables = tables();
    let headings: Vec<&str> = tables.iter().map(|t| t.heading.as_str()).collect();
    // The probing found the tables the format has today (a new one is checked as well).
    for known in [
        "Top level",
        "`[tls]`",
        "`[[tls.certificate]]`",
        "`[upstream]`",
        "`[store]`",
        "`[[pool]]`",
        "`[pool.session]`",
        "`[pool.affinity_cookie]`",
        "`[pool.health]`",
        "`[[pool.backend]]`",
    ] {
        assert!(
            headings.contains(&known),
            "no table {known} found: {headings:?}"
        );
    }
    let mut problems = Vec::new();
    for table in &tables {
        let Some(text) = section(&page, &table.heading) else {
            problems.push(format!(
                "no section `### {}` in docs/configuration.md",
                table.heading
            ));
            continue;
        };
        let rows = documented_keys(text);
        for key in &table.keys {
            let child = if table.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", table.path)
            };
            // A table-valued key is documented by its own section (checked as a table).
            let is_table = tables.iter().any(|t| t.path == child);
            if !rows.contains(key) && !is_table {
                problems.push(format!(
                    "key `{key}` of {} has no row in its key table",
                    table.heading
                ));
            }
        }
        for row in &rows {
            if !table.keys.contains(row) {
                problems.push(format!(
                    "{} documents `{row}`, which the table does not take",
                    table.heading
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md and the configuration structs differ:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_keys_list_at_the_top_of_the_reference_names_every_top_level_key() {
    let page = reference();
    let start = page
        .find("- [Keys](#keys)")
        .expect("the contents list the keys");
    let list = &page[start..];
    let list = &list[..list.find("\n- [What a reload").unwrap_or(list.len())];
    let tables = tables();
    let top = &tables[0];
    let missing: Vec<&String> = top
        .keys
        .iter()
        .filter(|k| {
            // Tables are listed by their link, `[tls]`, `[[pool]]`.
            let is_table = tables.iter().any(|t| &t.path == *k);
            !is_table && !list.contains(&format!("`{k}`"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the contents of docs/configuration.md leave out top-level keys: {missing:?}"
    );
}
