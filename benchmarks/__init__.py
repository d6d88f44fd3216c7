"""fastlora's benchmark suite: one harness (harness.py), small setups (linear, embedding, conv2d, llama),
the suite that runs them (suite.py, behind ``fastlora bench``) and the report (report.py)."""
