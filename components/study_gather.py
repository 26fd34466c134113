"""study-gather: one split's row results in one artifact (KFP fans in one loop level at a time)."""

from kfp.dsl import Dataset, Input, Output

from components.base import qfm_component


@qfm_component
def study_gather(split: str, results: Input[list[Dataset]], split_results: Output[Dataset]):
    """Collect the rows' results of `split` (study-row outputs): `split_results` holds split.json
    ({"split": SPLIT, "rows": {ROW: result}}) and ROW.csv, each row's test predictions."""
    import json
    import shutil
    from pathlib import Path

    from qfm.errors import DataError

    out = Path(split_results.path)
    out.mkdir(parents=True, exist_ok=True)
    found = {}
    for artifact in results:
        record = json.loads((Path(artifact.path) / "row.json").read_text())
        if record["split"] != split:
            raise DataError(f"a result of split '{record['split']}' reached the gather of split '{split}'")
        result = record["result"]
        if "predictions" in result:
            shutil.copyfile(Path(artifact.path) / result["predictions"], out / f"{record['row']}.csv")
            result["predictions"] = f"{record['row']}.csv"
        found[record["row"]] = result
    (out / "split.json").write_text(json.dumps({"split": split, "rows": found}, indent=2))
