"""Small widgets that render the state they are handed; none of them talks to the network."""

from tui.widgets.alerts import AlertsTable
from tui.widgets.events import EventsLog
from tui.widgets.participants import ParticipantsTable
from tui.widgets.plot import MetricsPlot
from tui.widgets.progress import RoundProgress
from tui.widgets.sessions import SessionsTable
from tui.widgets.status import SessionTitle, StatusBar

__all__ = [
    "AlertsTable",
    "EventsLog",
    "MetricsPlot",
    "ParticipantsTable",
    "RoundProgress",
    "SessionTitle",
    "SessionsTable",
    "StatusBar",
]
