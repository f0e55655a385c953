//! Errors in manifests, each naming the file, the line and the field.

use std::fmt;

/// One problem in a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    /// The file (as the source names it, e.g. `vms/web.yaml`).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The field path (`spec.memory`, `spec.network.ports[1]`); empty for the whole document.
    pub field: String,
    /// The object's `metadata.name`, when known.
    pub object: Option<String>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(object) = &self.object {
            write!(f, "VM {object:?}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

/// Every problem found in one or more manifests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl ManifestErrors {
    /// No errors.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// How many errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Adds the errors of `other`.
    pub fn extend(&mut self, other: ManifestErrors) {
        self.0.extend(other.0);
    }
    /// Adds one error.
    pub fn push(&mut self, e: ManifestError) {
        self.0.push(e);
    }
    /// The errors.
    pub fn iter(&self) -> impl Iterator<Item = &ManifestError> {
        self.0.iter()
    }
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}
