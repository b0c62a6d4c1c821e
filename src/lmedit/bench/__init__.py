"""The benchmark runner's package: stores of edits and baseline scores shared between runs and table cells."""
