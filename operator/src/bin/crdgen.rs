//! Prints the four CustomResourceDefinitions as one YAML stream, or, with `--out DIR`, writes one
//! file per CRD (`<plural>.lacuna.dev.yaml`) — what `crds/` and the chart's `crds/` hold.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;

fn render(crd: &impl serde::Serialize) -> anyhow::Result<String> {
    serde_saphyr::to_string(crd).context("serializing a CRD")
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out: Option<PathBuf> = match (args.next().as_deref(), args.next()) {
        (None, _) => None,
        (Some("--out"), Some(dir)) => Some(dir.into()),
        _ => anyhow::bail!("usage: crdgen [--out DIR]"),
    };
    let crds = lacuna_api::crd::crds();
    match out {
        None => {
            let mut stdout = std::io::stdout().lock();
            for crd in &crds {
                write!(stdout, "---\n{}", render(crd)?)?;
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in &crds {
                let path = dir.join(lacuna_api::crd::file_name(crd));
                // Atomic: a temporary name in the same directory, then a rename.
                let tmp = path.with_extension("yaml.tmp");
                let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                f.write_all(render(crd)?.as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}
