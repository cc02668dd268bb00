#!/bin/sh
# Counts the words of the payload. Contract: payload on stdin, result on stdout, exit 0.
set -eu
words=$(wc -w | tr -d ' ')
printf '%s' "$words"
