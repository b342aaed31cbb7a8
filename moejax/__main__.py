from moejax.cli import run

run()
