//! The runtime options containerd passes in Create: for a runtime type other than runc's,
//! containerd's CRI sends `runtimeoptions.v1.Options` (`TypeUrl`, `ConfigPath`, `ConfigBody`
//! in its config). husk reads `ConfigPath` (husk's JSON config file); anything else is refused
//! by name rather than ignored.

use std::path::PathBuf;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;

const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// What husk takes from the options.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Options {
    pub config_path: Option<PathBuf>,
}

pub fn parse(any: Option<&Any>) -> Result<Options, String> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
        return Ok(Options::default());
    };
    if any.type_url.trim_start_matches('/').rsplit('/').next() != Some(RUNTIME_OPTIONS) {
        return Err(format!(
            "runtime options of type {:?}: husk takes {RUNTIME_OPTIONS} (ConfigPath)",
            any.type_url
        ));
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut out = Options::default();
    let bad = |e: containerd_shim::protos::protobuf::Error| format!("runtime options: {e}");
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        match tag >> 3 {
            // TypeUrl: the type the config would be decoded as; husk has one.
            1 => drop(input.read_string().map_err(bad)?),
            2 => {
                let p = input.read_string().map_err(bad)?;
                if !p.is_empty() {
                    if !p.starts_with('/') {
                        return Err(format!("runtime option ConfigPath {p:?} must be absolute"));
                    }
                    out.config_path = Some(p.into());
                }
            }
            3 => {
                if !input.read_string().map_err(bad)?.is_empty() {
                    return Err("runtime option ConfigBody is not supported: use ConfigPath".into());
                }
            }
            n => return Err(format!("runtime options: unknown field {n}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;

    fn any(type_url: &str, fields: &[(u32, &str)]) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            for (n, v) in fields {
                out.write_string(*n, v).expect("write");
            }
            out.flush().expect("flush");
        }
        Any { type_url: type_url.into(), value, ..Default::default() }
    }

    #[test]
    fn config_path_is_taken_and_the_rest_refused_by_name() {
        assert_eq!(parse(None), Ok(Options::default()));
        let a = any("runtimeoptions.v1.Options", &[(1, "x"), (2, "/etc/husk/pod.json")]);
        assert_eq!(parse(Some(&a)).map(|o| o.config_path), Ok(Some("/etc/husk/pod.json".into())));
        let e = parse(Some(&any("runtimeoptions.v1.Options", &[(3, "{}")]))).expect_err("body");
        assert!(e.contains("ConfigBody"), "{e}");
        let e = parse(Some(&any("runtimeoptions.v1.Options", &[(2, "rel.json")]))).expect_err("relative");
        assert!(e.contains("absolute"), "{e}");
        let e = parse(Some(&any("containerd.runc.v1.Options", &[(1, "x")]))).expect_err("runc's");
        assert!(e.contains("containerd.runc.v1.Options"), "{e}");
        let e = parse(Some(&any("runtimeoptions.v1.Options", &[(9, "x")]))).expect_err("unknown field");
        assert!(e.contains("unknown field 9"), "{e}");
    }
}
