#!/usr/bin/env bash
# Shared by the launch scripts (sourced): print commands, run them unless a dry run.

# Prints a command as a shell would need it typed (quotes only where needed).
show() {
  local out="+" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
}

# Prints the command, then runs it unless dry_run=1 in the calling script.
run() {
  show "$@"
  if (( ! ${dry_run:-0} )); then "$@"; fi
}
