"""Pure ML and Hub code for model management: no Django imports, plain arguments in and
plain results out, so it runs in a notebook and in pytest without a database."""
