"""`canary completion bash|zsh|fish`: a shell completion script, generated from the
argument parser itself, so it can never name a command or flag the CLI does not have.

Static on purpose (no argcomplete): nothing new to install, and a TAB never starts
Python; what it cannot know (rollout ids) it leaves to the shell's own file completion.
"""

from __future__ import annotations

import argparse
from typing import Any


def _commands(p: argparse.ArgumentParser) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """Each subcommand: its flags (ending in "=" when they take a value), and the fixed
    choices of flags and positionals."""
    out: dict[str, tuple[list[str], dict[str, list[str]]]] = {}
    for action in p._actions:  # (argparse has no public walk of its subparsers)
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                flags: list[str] = []
                choices: dict[str, list[str]] = {}
                for a in sp._actions:
                    if a.help == argparse.SUPPRESS:
                        continue
                    flags += [o + ("=" if a.nargs != 0 else "") for o in a.option_strings
                              if o.startswith("--")]
                    if a.choices is not None:
                        key = a.option_strings[-1] if a.option_strings else ""
                        choices[key] = [str(c) for c in a.choices]
                out[name] = (flags, choices)
    return out


def bash(p: argparse.ArgumentParser) -> str:
    cmds = _commands(p)
    cases = []
    for name, (flags, choices) in cmds.items():
        words = " ".join([*(f.rstrip("=") for f in flags), *choices.get("", [])])
        opt_cases = "".join(f'            {flag}) COMPREPLY=($(compgen -W "{" ".join(c)}" -- '
                            f'"$cur")); return;;\n' for flag, c in choices.items() if flag)
        cases.append(f"        {name})\n"
                     f'            case "$prev" in\n{opt_cases}            esac\n'
                     f'            COMPREPLY=($(compgen -W "{words}" '
                     f'-- "$cur"))\n'
                     f'            [[ -z "$COMPREPLY" && "$cur" != -* ]] && '
                     f'COMPREPLY=($(compgen -f -- "$cur"));;\n')
    return f"""# bash completion for canary: eval "$(canary completion bash)"
_canary() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "{" ".join(cmds)} --help" -- "$cur")); return
    fi
    case "${{COMP_WORDS[1]}}" in
{"".join(cases)}    esac
}}
complete -o default -F _canary canary
"""


def zsh(p: argparse.ArgumentParser) -> str:
    cmds = _commands(p)
    helps = _helps(p)
    described = " ".join(f"'{n}:{_q(helps.get(n, ''))}'" for n in cmds)
    cases = []
    for name, (flags, choices) in cmds.items():
        specs = " ".join(_zsh_flag(f, choices) for f in flags)
        positional = f" '1:{name}:({' '.join(choices[''])})'" if "" in choices else " '*:file:_files'"
        cases.append(f"        {name}) _arguments {specs}{positional} ;;\n")
    return f"""#compdef canary
# zsh completion for canary: canary completion zsh > "${{fpath[1]}}/_canary"
_canary() {{
    local -a commands
    commands=({described})
    if (( CURRENT == 2 )); then
        _describe command commands; return
    fi
    local cmd=$words[2]
    shift words; (( CURRENT-- ))
    case $cmd in
{"".join(cases)}    esac
}}
compdef _canary canary
"""


def _zsh_flag(flag: str, choices: dict[str, list[str]]) -> str:
    name = flag.rstrip("=")
    if name in choices:
        return f"'{name}=[]:value:({' '.join(choices[name])})'"
    return f"'{name}=[]:value:'" if flag.endswith("=") else f"'{name}[]'"


def fish(p: argparse.ArgumentParser) -> str:
    cmds = _commands(p)
    helps = _helps(p)
    lines = ["# fish completion for canary: canary completion fish | source",
             "complete -c canary -f",
             *(f"complete -c canary -n __fish_use_subcommand -a {n} -d '{_q(helps.get(n, ''))}'"
               for n in cmds)]
    for name, (flags, choices) in cmds.items():
        cond = f"'__fish_seen_subcommand_from {name}'"
        for f in flags:
            name = f.rstrip("=")
            extra = (f" -xa '{' '.join(choices[name])}'" if name in choices
                     else " -r" if f.endswith("=") else "")
            lines.append(f"complete -c canary -n {cond} -l {name[2:]}{extra}")
        if "" in choices:
            lines.append(f"complete -c canary -n {cond} -xa '{' '.join(choices[''])}'")
        elif name in ("validate", "plan"):
            lines.append(f"complete -c canary -n {cond} -F")
    return "\n".join(lines) + "\n"


def _helps(p: argparse.ArgumentParser) -> dict[str, str]:
    out: dict[str, str] = {}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                out[choice.dest] = choice.help or ""
    return out


def _q(text: str) -> str:
    return text.replace("'", "").replace(":", " -")


SHELLS: dict[str, Any] = {"bash": bash, "zsh": zsh, "fish": fish}
