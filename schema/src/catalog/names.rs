//! What a name lookup can say back: unknown, ambiguous or malformed names, each with a hint
//! drawn from the catalog (a did-you-mean, the files to choose from).

use std::fmt;

/// Why a name did not resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LookupError {
    /// No interface of that name; maybe a close one.
    UnknownInterface {
        /// The name asked for.
        name: String,
        /// A known interface with a similar name.
        suggestion: Option<String>,
    },
    /// The interface (with its superclasses) has no such method.
    UnknownMethod {
        /// The interface asked for.
        interface: String,
        /// The method asked for.
        method: String,
        /// A method of that interface with a similar name.
        suggestion: Option<String>,
    },
    /// Two or more loaded files declare an interface of that name.
    Ambiguous {
        /// The name asked for.
        name: String,
        /// The files declaring it.
        files: Vec<String>,
        /// What followed the interface in the pattern (`.method`, `.*`), for the hint.
        rest: String,
    },
    /// A `file.capnp:` prefix that names no loaded file.
    UnknownFile {
        /// The file asked for.
        file: String,
        /// A loaded file with a similar name.
        suggestion: Option<String>,
    },
    /// Not of the form `Interface.method`, `Interface.*` or `*`.
    BadPattern {
        /// The text as written.
        pattern: String,
    },
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::UnknownInterface { name, suggestion } => {
                write!(f, "unknown interface `{name}`")?;
                if let Some(s) = suggestion {
                    write!(f, " (did you mean `{s}`?)")?;
                }
                Ok(())
            }
            LookupError::UnknownMethod {
                interface,
                method,
                suggestion,
            } => {
                write!(f, "interface `{interface}` has no method `{method}`")?;
                if let Some(s) = suggestion {
                    write!(f, " (did you mean `{interface}.{s}`?)")?;
                }
                Ok(())
            }
            LookupError::Ambiguous { name, files, rest } => {
                let choices: Vec<String> = files
                    .iter()
                    .map(|file| format!("`{}:{name}{rest}`", base_name(file)))
                    .collect();
                write!(
                    f,
                    "interface `{name}` is declared in {}: write {} to pick one",
                    files.join(" and "),
                    choices.join(" or ")
                )
            }
            LookupError::UnknownFile { file, suggestion } => {
                write!(f, "no loaded schema file `{file}`")?;
                if let Some(s) = suggestion {
                    write!(f, " (did you mean `{s}`?)")?;
                }
                Ok(())
            }
            LookupError::BadPattern { pattern } => write!(
                f,
                "`{pattern}`: write `Interface.method`, `Interface.*` or `*` (optionally \
                 `file.capnp:Interface.method`)"
            ),
        }
    }
}

impl std::error::Error for LookupError {}

/// The last path component of a schema file name (`dir/app.capnp` -> `app.capnp`).
pub(crate) fn base_name(file: &str) -> &str {
    file.rsplit('/').next().unwrap_or(file)
}

/// The candidate closest to `name` (edit distance at most 2, or a case-insensitive match).
pub fn suggest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    candidates
        .map(|c| {
            let d = if c.to_ascii_lowercase() == lower {
                0
            } else {
                edit_distance(&lower, &c.to_ascii_lowercase())
            };
            (d, c)
        })
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Names longer than this are never "close" to a typo; bounds the work on hostile input.
    if a.len().abs_diff(b.len()) > 2 || a.len() > 256 || b.len() > 256 {
        return usize::MAX;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
