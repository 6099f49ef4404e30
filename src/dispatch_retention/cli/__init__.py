"""The command line (README "Command line"): parse, call one library function, map the
outcome to an exit code. `root` holds the root group, `main` the assembled command line.
"""
