//! Names that become parts of paths or libvirt object names. Such a name must not be able to
//! leave the folder it is put in, nor smuggle anything into a command line.

/// A name that cannot be used as a path component.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {why}")]
pub struct NameError {
    pub name: String,
    pub why: &'static str,
}

/// Checks a VM (domain) name for use as a path component: 1 to 200 characters of letters,
/// digits, `.`, `-`, `_` and `+`, not starting with `.` or `-`.
pub fn check_component(name: &str) -> Result<&str, NameError> {
    let bad = |why| {
        Err(NameError {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 200 {
        return bad("longer than 200 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("starts with '.' or '-'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
    {
        return bad("only letters, digits, '.', '-', '_' and '+' are allowed");
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::check_component;

    #[test]
    fn accepts_ordinary_vm_names() {
        for n in ["web01", "db-2.prod", "a_b+c", "X"] {
            assert_eq!(check_component(n).unwrap(), n);
        }
    }

    #[test]
    fn refuses_names_that_could_escape_a_folder() {
        for n in [
            "", ".", "..", "../x", "a/b", "-rf", ".hidden", "a b", "a\0b", "é",
        ] {
            assert!(check_component(n).is_err(), "{n:?} was accepted");
        }
        assert!(check_component(&"a".repeat(201)).is_err());
    }
}
