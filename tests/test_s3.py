"""Object storage against a real S3 endpoint (moto_server on 127.0.0.1): verified, resumable downloads and
uploads, `qfm ingest` from and step outputs to s3://, MLflow artifacts and a DVC remote on it, injected transient
errors retried, truncated downloads caught, and clear errors for a missing bucket or key and bad credentials."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
from s3_server import FaultProxy

from qfm.data.demo import make_demo
from qfm.data.manifest import read_manifest
from qfm.errors import DataError
from qfm.storage.s3 import download_file, download_prefix, head_object, make_client, upload_dir

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A small demo dataset of real photographs: 6 x 4 distortions x 2 levels = 48 scored images, 24 pool images, CSVs."""
    root = tmp_path_factory.mktemp("s3-demo") / "demo"
    make_demo(root, seed=0, n_references=6, n_scenes=0, n_levels=2, pool_levels=1, image_size=128, progress=False)
    return root


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"qfm-{uuid.uuid4().hex[:12]}"
    make_client().create_bucket(Bucket=name)
    return name


def _put_plain(client, bucket: str, prefix: str, folder: Path) -> list[Path]:
    """Upload a folder object by object with no qfm metadata, as another tool would."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    return files


def _same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_download_is_verified_resumable_and_skips_identical_files(demo, bucket, tmp_path):
    client = make_client()
    files = _put_plain(client, bucket, "plain", demo)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 2**20))  # over boto3's 8 MiB threshold: a multipart ETag
    client.upload_file(str(big), bucket, "plain/big.bin")
    dest = tmp_path / "mirror"
    report = download_prefix(f"s3://{bucket}/plain", dest, client, workers=8)
    assert (report.files, report.transferred, report.skipped) == (len(files) + 1, len(files) + 1, 0)
    assert report.verified_by == {"md5": len(files), "multipart-md5": 1}
    assert report.bytes == sum(p.stat().st_size for p in files) + big.stat().st_size
    assert (dest / "big.bin").read_bytes() == big.read_bytes()
    (dest / "big.bin").unlink()
    shutil.copy(big, tmp_path / "keep.bin")
    _same_tree(demo, dest)

    # An interrupted earlier run: one file cut short, one missing, a temporary file left behind.
    victim = dest / "images" / min(p.name for p in (dest / "images").iterdir())
    victim.write_bytes(victim.read_bytes()[:100])
    (dest / "scores.csv").unlink()
    (dest / "images" / ".x.png.part-99999999-1").write_bytes(b"junk")  # of a process long gone
    again = download_prefix(f"s3://{bucket}/plain", dest, client, workers=8)
    assert (again.transferred, again.skipped) == (3, len(files) - 2)  # the cut file, the missing one, big.bin
    assert not list(dest.rglob(".*.part-*"))
    assert (dest / "big.bin").read_bytes() == big.read_bytes()
    (dest / "big.bin").unlink()
    _same_tree(demo, dest)


def test_upload_stores_sha256_metadata_skips_unchanged_files_and_round_trips(demo, bucket, tmp_path):
    client = make_client()
    report = upload_dir(demo, f"s3://{bucket}/up", client)
    n = sum(1 for p in demo.rglob("*") if p.is_file())
    assert (report.transferred, report.verified_by["sha256"]) == (n, n)
    scores = demo / "scores.csv"
    assert head_object(f"s3://{bucket}/up/scores.csv", client).sha256 == hashlib.sha256(scores.read_bytes()).hexdigest()
    local = tmp_path / "changed"
    shutil.copytree(demo, local)
    (local / "scores.csv").write_text((local / "scores.csv").read_text() + "\n")
    (local / ".scores.csv.tmp-99").write_text("a killed writer's temporary file")
    second = upload_dir(local, f"s3://{bucket}/up", client)
    assert (second.transferred, second.skipped, second.excluded) == (1, n - 1, [".scores.csv.tmp-99"])
    back = download_prefix(f"s3://{bucket}/up", tmp_path / "back", client)
    assert back.verified_by == {"sha256": n}
    (local / ".scores.csv.tmp-99").unlink()
    _same_tree(local, tmp_path / "back")


def test_cli_ingests_from_s3_and_uploads_its_outputs(demo, bucket, s3_env, tmp_path):
    n = len(_put_plain(make_client(), bucket, "datasets/demo", demo))
    cmd = [sys.executable, "-m", "qfm.cli", "ingest", "--format", "demo", "--root", f"s3://{bucket}/datasets/demo",
           "--out", f"s3://{bucket}/runs/ingest", "--cache", str(tmp_path / "cache"), "--n-splits", "2", "--quiet"]
    first = subprocess.run(cmd, check=False, capture_output=True, text=True, env=os.environ | s3_env, cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"fetched s3://{bucket}/datasets/demo: {n} files, {n} transferred" in first.stdout
    assert "ingested 48 images of 'demo'" in first.stdout
    assert f"-> s3://{bucket}/runs/ingest: 2 files, 2 transferred" in first.stdout
    download_prefix(f"s3://{bucket}/runs/ingest", tmp_path / "out", make_client())
    manifest = read_manifest(tmp_path / "out", root=tmp_path / "cache" / bucket / "datasets" / "demo")
    assert len(manifest.frame) == 48 and manifest.split_columns == ["split_0", "split_1"]
    assert all(manifest.image_path(p).is_file() for p in manifest.frame["path"])
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, env=os.environ | s3_env, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"{n} files, 0 transferred (0.0 MB), {n} already identical" in again.stdout  # resumable: nothing refetched
    assert "2 files, 0 transferred (0.0 MB), 2 already identical" in again.stdout    # same outputs, not re-uploaded
    missing = subprocess.run([*cmd[:7], f"s3://{bucket}-gone/demo", *cmd[8:]], check=False, capture_output=True, text=True,
                             env=os.environ | s3_env, cwd=tmp_path, timeout=120)
    assert missing.returncode == 2
    assert f"S3 bucket '{bucket}-gone' does not exist" in missing.stderr


def test_transient_errors_and_broken_reads_are_retried(demo, bucket, moto_s3, tmp_path):
    client = make_client()
    upload_dir(demo, f"s3://{bucket}/data", client)
    with FaultProxy(moto_s3.port) as proxy:
        flaky = make_client(proxy.url)
        proxy.inject("500", times=2, path_contains="/images/")
        proxy.inject("503", times=1, path_contains="/pool/")      # SlowDown: throttling
        proxy.inject("cut", times=2, path_contains="scores.csv")  # the body breaks off half-way
        proxy.inject("short", times=1, path_contains="pool.csv")  # a short body that looks complete
        proxy.inject("500", times=2, method="PUT")
        report = download_prefix(f"s3://{bucket}/data", tmp_path / "down", flaky, workers=4)
        assert report.transferred == report.files and report.retries == 3  # 2 cut + 1 short, retried by qfm
        (tmp_path / "down" / "new.txt").write_text("new")
        up = upload_dir(tmp_path / "down", f"s3://{bucket}/data", flaky, workers=4)
        assert (up.transferred, up.skipped) == (1, report.files)           # only the new file is sent
        assert make_client().get_object(Bucket=bucket, Key="data/new.txt")["Body"].read() == b"new"
        assert sorted(a for *_, a in proxy.hits) == ["500"] * 4 + ["503", "cut", "cut", "short"]
    (tmp_path / "down" / "new.txt").unlink()
    _same_tree(demo, tmp_path / "down")


def test_truncated_downloads_are_detected_and_never_put_in_place(demo, bucket, moto_s3, tmp_path):
    client = make_client()
    _put_plain(client, bucket, "data", demo)
    with FaultProxy(moto_s3.port) as proxy:
        flaky = make_client(proxy.url)
        proxy.inject("short", times=3, path_contains="scores.csv")
        with pytest.raises(DataError, match=r"scores\.csv failed 3 times \(_BadBytes: .*do not match the object's md5"):
            download_file(f"s3://{bucket}/data/scores.csv", tmp_path / "scores.csv", flaky, max_attempts=3)
        proxy.inject("cut", times=3, path_contains="pool.csv")
        with pytest.raises(DataError, match=r"pool\.csv failed 3 times \(IncompleteReadError"):
            download_file(f"s3://{bucket}/data/pool.csv", tmp_path / "pool.csv", flaky, max_attempts=3)
    assert not list(tmp_path.iterdir()), "nothing, not even a temporary file, is left"


def test_missing_bucket_missing_key_and_bad_credentials_give_clear_errors(bucket, moto_s3, monkeypatch, tmp_path):
    client = make_client()
    client.put_object(Bucket=bucket, Key="data/a.txt", Body=b"a")
    with pytest.raises(DataError, match=r"S3 bucket 'no-such-bucket-x' does not exist at http://127\.0\.0\.1"):
        download_prefix("s3://no-such-bucket-x/data", tmp_path, client)
    with pytest.raises(DataError, match=rf"s3://{bucket}/data/b\.txt does not exist .*aws s3 ls s3://{bucket}/data/"):
        download_file(f"s3://{bucket}/data/b.txt", tmp_path / "b.txt", client)
    with pytest.raises(DataError, match=rf"s3://{bucket}/data/b\.txt does not exist"):
        head_object(f"s3://{bucket}/data/b.txt", client)   # a HEAD 404 has no body: resolved to the same message
    with pytest.raises(DataError, match=rf"nothing under s3://{bucket}/dta/"):
        download_prefix(f"s3://{bucket}/dta", tmp_path, client)
    moto_s3.require_auth_after(2)  # enough for the two IAM calls below; every later request is checked
    try:
        iam = boto3.client("iam", endpoint_url=moto_s3.url, region_name="us-east-1")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]   # a valid key with no permission at all
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(DataError, match=rf"access denied to s3://{bucket}/data .*s3:GetObject and s3:ListBucket"):
            download_prefix(f"s3://{bucket}/data", tmp_path, make_client())
        with pytest.raises(DataError, match=rf"access denied to s3://{bucket}/data/a\.txt .*\(while checking\)"):
            head_object(f"s3://{bucket}/data/a.txt", make_client())  # a HEAD 403, resolved by a 1-byte GET
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(DataError, match=r"rejected the credentials .*\(SignatureDoesNotMatch.*AWS_SECRET_ACCESS_KEY"):
            download_file(f"s3://{bucket}/data/a.txt", tmp_path / "a.txt", make_client())
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x.txt").write_text("x")
        with pytest.raises(DataError, match=rf"rejected the credentials .* for s3://{bucket}/up \(InvalidAccessKeyId"):
            upload_dir(tmp_path / "out", f"s3://{bucket}/up", make_client())
    finally:
        moto_s3.require_auth_after("inf")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(DataError, match=r"no usable AWS credentials for s3://.*set AWS_PROFILE"):
        download_prefix(f"s3://{bucket}/data", tmp_path, make_client())


def test_mlflow_logs_artifacts_to_s3(bucket, s3_env, tmp_path):
    """An experiment whose artifact root is s3://...: MLflow's S3 store reaches moto via MLFLOW_S3_ENDPOINT_URL."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # no global tracking state is touched
    experiment = client.create_experiment("s3-artifacts", artifact_location=f"s3://{bucket}/mlflow")
    run = client.create_run(experiment)
    report = tmp_path / "metrics.json"
    report.write_text('{"srcc": 0.9}\n')
    client.log_metric(run.info.run_id, "srcc", 0.9)
    client.log_artifact(run.info.run_id, str(report), "eval")
    client.log_dict(run.info.run_id, {"epochs": 3}, "params/train.json")
    client.set_terminated(run.info.run_id)
    base = f"mlflow/{run.info.run_id}/artifacts"
    keys = sorted(o["Key"] for o in make_client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [f"{base}/eval/metrics.json", f"{base}/params/train.json"]
    assert client.get_run(run.info.run_id).info.artifact_uri == f"s3://{bucket}/{base}"
    assert [f.path for f in client.list_artifacts(run.info.run_id, "eval")] == ["eval/metrics.json"]
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"s3://{bucket}/{base}/eval/metrics.json",
                                                dst_path=str(tmp_path / "back"))
    assert Path(local).read_text() == report.read_text()


def test_dvc_pushes_to_and_pulls_from_an_s3_remote(demo, bucket, s3_env, moto_s3, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(demo, repo / "data")
    env = os.environ | s3_env | {"DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
        return done.stdout

    dvc = str(BIN / "dvc")
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "remote", "add", "-d", "store", f"s3://{bucket}/dvcstore")
    run(dvc, "remote", "modify", "store", "endpointurl", moto_s3.url)
    run(dvc, "add", "-q", "data")
    run(dvc, "push", "-q")
    keys = [o["Key"] for o in make_client().list_objects_v2(Bucket=bucket, Prefix="dvcstore/")["Contents"]]
    n = sum(1 for p in demo.rglob("*") if p.is_file())
    assert len(keys) == n + 1 and all(k.startswith("dvcstore/files/md5/") for k in keys)  # files + the .dir list
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    run(dvc, "pull", "-q")
    _same_tree(demo, repo / "data")


def test_cli_checks_s3_paths_before_running_a_step(s3_env, tmp_path, capsys):
    from qfm.cli import main

    code = main(["train-teacher", "--manifest", str(tmp_path), "--out", "s3://qfm-no-such-bucket/teacher"])
    assert code == 2  # refused before any training starts
    assert "S3 bucket 'qfm-no-such-bucket' does not exist" in capsys.readouterr().err
    code = main(["score", str(tmp_path), "--model", str(tmp_path), "--out", "s3://bucket/scores.csv"])
    assert code == 2
    assert "qfm score --out cannot be an s3:// URI" in capsys.readouterr().err
