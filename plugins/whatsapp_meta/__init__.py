"""Provider plugin ``meta`` (WhatsApp Cloud API): not implemented yet (issue 4).

It registers through the entry-point group like every plugin and implements no hook, so
``gateway plugins`` lists it with "(no hooks)" and no ``[providers.meta]`` section is accepted.
"""
