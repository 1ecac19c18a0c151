//! Prints the CustomResourceDefinition of `MrcpServer` as YAML (`make crds` writes it to
//! `crds/` and the chart; a test fails when the committed files differ).

fn main() -> anyhow::Result<()> {
    print!("{}", lb_operator::crd_yaml()?);
    Ok(())
}
