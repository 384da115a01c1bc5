"""What the tests share: scripted servers, toy models, fuzzing, fixtures, network namespaces."""
