"""Tests that the READMEs tell the truth: the two bug tables agree, name tests that exist, and
every train.py command they show parses."""
import re
import shlex
import unittest

import degradation
import options
from test_helpers import HERE

READMES = ('README.md', 'README.ja.md')


def read(name):
    return (HERE / name).read_text(encoding='utf-8')


def bug_table(text):
    """{row number: [test names]} of the table whose rows start '| N |' and end in tests."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r'\| (\d+) \|', line)
        if m:
            rows[int(m.group(1))] = re.findall(r'`(\w+Test\.test_\w+)`', line.split('|')[-2])
    return rows


def test_names():
    """Every 'Class.test_method' of the test files that `python -m unittest test_models` runs."""
    suite = unittest.defaultTestLoader.loadTestsFromName('test_models')
    names = set()

    def walk(s):
        for t in s:
            if isinstance(t, unittest.TestSuite):
                walk(t)
            else:
                names.add(f'{type(t).__name__}.{t._testMethodName}')
    walk(suite)
    return names


class ReadmeTest(unittest.TestCase):

    def test_readme_is_short_and_each_links_the_other(self):
        self.assertLessEqual(len(read('README.md')), 17_000)
        self.assertIn('(README.ja.md)', read('README.md').split('\n## ')[0])
        self.assertIn('(README.md)', read('README.ja.md').split('\n## ')[0])

    def test_bug_tables_agree_and_name_real_tests(self):
        english, japanese = (bug_table(read(name)) for name in READMES)
        self.assertEqual(sorted(english), list(range(1, len(english) + 1)))
        self.assertGreaterEqual(len(english), 17)
        self.assertEqual(english, japanese)
        missing = {t for tests in english.values() for t in tests} - test_names()
        self.assertEqual(missing, set())
        self.assertTrue(all(english.values()), 'every row names a test')

    def test_both_readmes_show_the_same_commands_and_figures(self):
        english, japanese = (read(name) for name in READMES)
        command = r'python (?:train|degradation|predict|resnet|benchmark)\.py[^`|\n#]*'
        for pattern in (command, r'\d+\.\d+%'):
            with self.subTest(pattern):
                self.assertEqual({c.strip() for c in re.findall(pattern, english)},
                                 {c.strip() for c in re.findall(pattern, japanese)})

    def test_every_train_command_shown_parses(self):
        for name in READMES:
            commands = re.findall(r'python train\.py[^`|\n#]*', read(name))
            self.assertGreater(len(commands), 5, name)
            for command in commands:
                with self.subTest(readme=name, command=command):
                    argv = shlex.split(command)[2:]
                    try:
                        args = options.parse_args(argv)
                    except SystemExit:
                        self.fail(f'{name}: {command!r} does not parse')
                    options.check_args(args)
            for command in re.findall(r'python degradation\.py[^`|\n#]*', read(name)):
                with self.subTest(readme=name, command=command):
                    try:
                        args = degradation.parse_args(shlex.split(command)[2:])
                    except SystemExit:
                        self.fail(f'{name}: {command!r} does not parse')
                    for depth in args.depths:
                        degradation.blocks_of(depth)


if __name__ == '__main__':
    unittest.main()
