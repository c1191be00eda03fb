"""The error a user can fix: a wrong option, file, weight file or checkpoint. `python -m ase_model.train` prints its
message in one or two lines and exits with status 2; every other exception keeps its traceback."""


class UserError(Exception):
    """A problem with what the user asked for; the message names the option or file and what was expected."""
