"""How a step is computed fast, never what it computes: batch layout (packing), and the speed mechanisms
the loop switches on through one entry."""
