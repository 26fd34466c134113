"""One function per pipeline step. The CLI, the DVC stages and the Kubeflow components all call these;
steps talk only through the files they write (see docs/architecture.md for each folder's layout)."""
