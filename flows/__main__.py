"""``python -m flows experiment -m lora -m ia3``: start a flow from the command line (flows/cli.py)."""

from flows.cli import flows_app as app

if __name__ == "__main__":
    app()
