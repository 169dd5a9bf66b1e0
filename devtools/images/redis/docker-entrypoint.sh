#!/bin/sh
# As the official redis image does: a redis-server started without a config file would
# refuse every client but loopback (protected mode, no password), which is useless in a
# container reached over its network. Turn it off unless the command says otherwise.
set -e
if [ "$1" = "redis-server" ]; then
  case " $* " in
    *" --protected-mode "*) ;;
    *) set -- "$@" --protected-mode no ;;
  esac
fi
exec "$@"
