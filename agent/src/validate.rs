//! Checks on names and paths that arrive in requests, before they touch the file system.

use std::path::{Component, Path};

use crate::error::AgentError;

/// Container ids, exec ids, share tags and stdio stream names: 1–64 of `[A-Za-z0-9_.-]`, not
/// starting with `.` (they become file names under the agent's state directory).
pub fn name(kind: &'static str, value: &str) -> Result<(), AgentError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with('.')
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "{kind} {value:?} is not 1-64 characters of [A-Za-z0-9_.-] not starting with '.'"
        )))
    }
}

/// An exec id may be empty (the container's init process); otherwise it is a [`name`].
pub fn exec_id(value: &str) -> Result<(), AgentError> {
    if value.is_empty() {
        Ok(())
    } else {
        name("exec id", value)
    }
}

/// A relative path made only of normal components: no `..`, no root, no `.` games.
pub fn relative_path(kind: &'static str, value: &str) -> Result<(), AgentError> {
    if value.len() > 4096 || value.contains('\0') {
        return Err(AgentError::InvalidArgument(format!("{kind} is too long or contains NUL")));
    }
    let p = Path::new(value);
    if p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "{kind} {value:?} must be relative and must not contain '..'"
        )))
    }
}

/// An absolute path without `..` (mount destinations and sources).
pub fn absolute_path(kind: &'static str, value: &Path) -> Result<(), AgentError> {
    let ok = value.is_absolute()
        && value.as_os_str().len() <= 4096
        && value
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "{kind} {} must be absolute and must not contain '..'",
            value.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "abc-DEF_1.2", &"x".repeat(64)] {
            assert!(name("id", good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65), "é"] {
            assert!(name("id", bad).is_err(), "{bad}");
        }
        assert!(exec_id("").is_ok());
        assert!(exec_id("../x").is_err());
    }

    #[test]
    fn paths() {
        for good in ["", "rootfs", "a/b/c", "./a"] {
            assert!(relative_path("p", good).is_ok(), "{good}");
        }
        for bad in ["/abs", "..", "a/../../b", "a/..", "a\0b"] {
            assert!(relative_path("p", bad).is_err(), "{bad}");
        }
        assert!(absolute_path("p", Path::new("/a/b")).is_ok());
        for bad in ["a", "/a/../b", "/.."] {
            assert!(absolute_path("p", Path::new(bad)).is_err(), "{bad}");
        }
    }
}
